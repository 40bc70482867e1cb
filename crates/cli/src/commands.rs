//! Command handlers: load settings, build adapters, call the engine, render.
//! No business logic lives here.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;

use anyhow::Context;
use retrain_adapters::settings::{self, ConfigSources, LoadedSettings};
use retrain_adapters::wiring;
use retrain_core::domain::{Label, RunId};
use retrain_core::engine::CycleRequest;
use retrain_core::journal::RunFilter;
use retrain_core::machine::LabelRun;
use retrain_core::manifest::ManifestDocument;
use retrain_core::ports::RunStore;
use retrain_core::report::{CycleReport, LabelStatus};
use retrain_core::CancellationToken;
use serde_json::json;

use crate::args::{
    Cli, Command, ConfigCommand, GateArgs, InfraCommand, MetricsArgs, MetricsFormat, OutputFormat,
    RunArgs, RunsCommand, ShowFormat,
};
use crate::output;
use crate::signals::Interrupt;

/// Exit codes (§7), set in one place.
pub mod exit {
    pub const OK: u8 = 0;
    pub const LABEL_FAILED: u8 = 1;
    pub const CONFIG: u8 = 2;
    pub const GATE_REJECTED: u8 = 3;
    pub const SIGINT: u8 = 130;
    pub const SIGTERM: u8 = 143;
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        Self {
            code: exit::LABEL_FAILED,
            error: error.into(),
        }
    }
}

pub(crate) fn config_failure(error: impl std::fmt::Display) -> Failure {
    Failure {
        code: exit::CONFIG,
        error: anyhow::anyhow!("configuration error: {error}"),
    }
}

fn load(cli: &Cli, dry_run: bool) -> Result<LoadedSettings, Failure> {
    let mut sources = ConfigSources::from_process(cli.config.clone());
    if let Some(state) = &cli.state {
        sources.overrides.push(("state".into(), json!(state)));
    }
    if dry_run {
        sources.overrides.push(("dry_run".into(), json!(true)));
    }
    settings::load(&sources).map_err(config_failure)
}

fn parse_labels(raw: &[String]) -> Result<Vec<Label>, Failure> {
    raw.iter()
        .map(|l| Label::new(l).map_err(|e| config_failure(format!("--label: {e}"))))
        .collect()
}

pub async fn dispatch(cli: Cli, interrupt: Interrupt) -> Result<u8, Failure> {
    match &cli.command {
        Command::Run(args) => run(&cli, args, args.dry_run, interrupt).await,
        Command::Plan(labels) => {
            let args = RunArgs {
                labels: crate::args::LabelsArg {
                    labels: labels.labels.clone(),
                },
                dry_run: true,
                fail_on_reject: false,
                no_reap: true,
            };
            run(&cli, &args, true, interrupt).await
        }
        Command::Status(labels) => status(&cli, &labels.labels).await,
        Command::Runs(args) => match &args.command {
            None => runs_list(&cli, args.label.as_deref(), args.limit).await,
            Some(RunsCommand::Show { id, format }) => runs_show(&cli, id, *format).await,
        },
        Command::History(args) => history(&cli, &args.label).await,
        Command::Approve(args) => decide(&cli, args, true).await,
        Command::Reject(args) => decide(&cli, args, false).await,
        Command::Approvals(labels) => approvals(&cli, &labels.labels).await,
        Command::Rollback(args) => rollback(&cli, args).await,
        Command::Gate(args) => gate(&cli, args).await,
        Command::Metrics(args) => metrics(&cli, args).await,
        Command::Infra(args) => infra(&cli, &args.command).await,
        Command::Config(args) => config(&cli, &args.command),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut command = Cli::command();
            clap_complete::generate(*shell, &mut command, "retrain", &mut std::io::stdout());
            Ok(exit::OK)
        }
        Command::Worker(args) => crate::worker::worker(args, interrupt).await,
        Command::Workers(args) => crate::worker::workers(&cli, args).await,
        Command::Migrate => {
            let loaded = load(&cli, false)?;
            wiring::migrate(&loaded.settings)
                .await
                .context("migrating the run store")?;
            println!("run store schema is up to date");
            Ok(exit::OK)
        }
    }
}

/// The store for read-only commands: creates and migrates nothing.
async fn reading_store(loaded: &LoadedSettings) -> Result<Arc<dyn RunStore>, Failure> {
    Ok(wiring::open_store_for_reading(&loaded.settings)
        .await
        .context("opening the run store")?)
}

async fn store(loaded: &LoadedSettings) -> Result<Arc<dyn RunStore>, Failure> {
    let store = wiring::open_store(&loaded.settings, true)
        .await
        .context("opening the run store")?;
    Ok(store)
}

async fn run(
    cli: &Cli,
    args: &RunArgs,
    dry_run: bool,
    interrupt: Interrupt,
) -> Result<u8, Failure> {
    let loaded = load(cli, dry_run)?;
    let dry_run = loaded.settings.dry_run;
    let labels = parse_labels(&args.labels.labels)?;
    // A plan must change nothing: never create or migrate the store for it.
    let store = if dry_run {
        reading_store(&loaded).await?
    } else {
        store(&loaded).await?
    };
    let engine = wiring::build_engine(&loaded, store.clone())
        .await
        .map_err(config_failure)?;
    let cancel: CancellationToken = interrupt.token();
    if !dry_run && !args.no_reap {
        match engine.reap_leases(false).await {
            Ok(reaped) if !reaped.is_empty() => {
                tracing::warn!(
                    count = reaped.len(),
                    "stopped stale leases before the cycle"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not reap stale leases"),
        }
    }
    let request = CycleRequest {
        labels: (!labels.is_empty()).then_some(labels),
        dry_run,
    };
    let report = engine.run_cycle(request, cancel).await;
    // Freeze the status lines (terminal only) before the report is printed.
    crate::progress::finish();
    let report = report.map_err(|e| match e {
        retrain_core::engine::EngineError::UnknownLabel(..) => config_failure(e),
        other => Failure::from(anyhow::Error::new(other)),
    })?;
    let cycle_id = report.cycle_id.to_string();
    crate::telemetry::process_step(
        "startup",
        &cycle_id,
        crate::telemetry::process_started(),
        report.started_at,
    );
    if !dry_run {
        // The cycle's runs and the waiting runs it closed.
        let runs = report
            .labels
            .iter()
            .flat_map(|l| l.run_id.iter().chain(&l.closed_runs));
        write_manifests(store.as_ref(), &loaded.settings.state_dir, runs).await;
    }
    render_cycle(cli, &report)?;
    crate::telemetry::process_step("finish", &cycle_id, report.finished_at, chrono::Utc::now());
    Ok(cycle_exit_code(&report, args.fail_on_reject, &interrupt))
}

/// Runs whose snapshots one statement reads when writing manifests: bounds
/// what a 10,000-label cycle holds at once to a few hundred snapshots.
const MANIFESTS_PER_READ: usize = 256;

/// `state_dir/runs/<run_id>/manifest.json` for every run of `runs` (those of
/// a cycle, a `retrain gate`, a decision), as journaled. The snapshots are
/// read [`MANIFESTS_PER_READ`] at a time (`RunStore::run_snapshots`; one
/// statement each, where a run's full read is two and carries its journal
/// lines). A failure is logged: the manifest stays in the run store.
async fn write_manifests<'a>(
    store: &dyn RunStore,
    state_dir: &std::path::Path,
    runs: impl Iterator<Item = &'a RunId>,
) {
    let runs: Vec<RunId> = runs.cloned().collect();
    for ids in runs.chunks(MANIFESTS_PER_READ) {
        let snapshots = match store.run_snapshots(ids).await {
            Ok(snapshots) => snapshots,
            Err(error) => {
                tracing::warn!(runs = ids.len(), error = %error, "could not read runs to write their manifests");
                continue;
            }
        };
        let mut missing: std::collections::HashSet<&RunId> = ids.iter().collect();
        for run in &snapshots {
            missing.remove(&run.run_id);
            if let Err(error) = write_manifest(state_dir, run) {
                tracing::warn!(run_id = %run.run_id, error = %format!("{error:#}"), "could not write the run manifest");
            }
        }
        for run_id in missing {
            tracing::warn!(run_id = %run_id, error = "not in the run store", "could not write the run manifest");
        }
    }
}

/// One run's manifest, written whole or not at all (a temporary file
/// renamed over it).
fn write_manifest(state_dir: &std::path::Path, run: &LabelRun) -> anyhow::Result<()> {
    let dir = state_dir.join("runs").join(run.run_id.as_str());
    std::fs::create_dir_all(&dir)?;
    let text = serde_json::to_string_pretty(&ManifestDocument::from_run(run))?;
    let tmp = dir.join("manifest.json.tmp");
    std::fs::write(&tmp, text + "\n")?;
    std::fs::rename(&tmp, dir.join("manifest.json"))?;
    Ok(())
}

fn render_cycle(cli: &Cli, report: &CycleReport) -> Result<(), Failure> {
    match cli.output {
        OutputFormat::Json => output::print_json(report)?,
        OutputFormat::Text => output::print_cycle_text(report),
    }
    if output::in_github_actions() {
        output::github_actions(report)?;
    }
    Ok(())
}

fn cycle_exit_code(report: &CycleReport, fail_on_reject: bool, interrupt: &Interrupt) -> u8 {
    if let Some(code) = interrupt.exit_code() {
        return code;
    }
    if report
        .labels
        .iter()
        .any(|l| l.status == LabelStatus::Interrupted)
    {
        return exit::SIGINT;
    }
    if report.any_failed() {
        return exit::LABEL_FAILED;
    }
    if fail_on_reject && report.any_rejected() {
        return exit::GATE_REJECTED;
    }
    exit::OK
}

/// One label's line of `retrain status`; `--output json` prints these as
/// they are. Typed, not a `json!` object per label: at 10,000 labels
/// building and dropping the objects was a fifth of the command.
#[derive(serde::Serialize)]
struct StatusLine<'a> {
    label: &'a Label,
    threshold: u64,
    watermark: Option<chrono::DateTime<chrono::Utc>>,
    last_version: Option<&'a retrain_core::domain::VersionTag>,
    rejected_version: Option<&'a retrain_core::domain::VersionTag>,
    locked_by: Option<&'a str>,
    awaiting_approval: Option<&'a RunId>,
    last_run: Option<LastRunLine<'a>>,
    remote_jobs: Vec<serde_json::Value>,
}

/// The newest run in a [`StatusLine`].
#[derive(serde::Serialize)]
struct LastRunLine<'a> {
    run_id: &'a RunId,
    stage: retrain_core::machine::Stage,
    outcome: &'a str,
    updated_at: chrono::DateTime<chrono::Utc>,
    verdict: Option<&'a str>,
}

async fn status(cli: &Cli, raw_labels: &[String]) -> Result<u8, Failure> {
    let loaded = load(cli, false)?;
    let stores = wiring::open_stores_for_reading(&loaded.settings)
        .await
        .context("opening the run store")?;
    let wanted = parse_labels(raw_labels)?;
    let selected: Vec<_> = loaded
        .settings
        .labels
        .iter()
        .filter(|(label, _)| wanted.is_empty() || wanted.contains(label))
        .collect();
    let names: Vec<Label> = selected.iter().map(|(label, _)| (*label).clone()).collect();
    // One query for every label, not several per label.
    let statuses = stores
        .runs
        .label_statuses(&names)
        .await
        .context("reading the labels' status")?;
    // The remote jobs waiting for or held by a worker: one read of the whole
    // queue (the one `GET /v1/workers/queue` serves), grouped by label here.
    let now = chrono::Utc::now();
    let mut remote_jobs: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for job in stores
        .jobs
        .queue()
        .await
        .context("reading the remote job queue")?
    {
        remote_jobs
            .entry(job.label.clone())
            .or_default()
            .push(output::remote_job_json(&job, now));
    }
    let lines: Vec<StatusLine> = selected
        .iter()
        .zip(&statuses)
        .map(|((label, label_settings), status)| StatusLine {
            label,
            threshold: label_settings.threshold,
            watermark: status.cursor.watermark,
            last_version: status.cursor.consumed_version.as_ref(),
            rejected_version: status.cursor.rejected_version.as_ref(),
            locked_by: status.locked_by.as_deref(),
            awaiting_approval: status.awaiting_approval.as_ref(),
            last_run: status.last_run.as_ref().map(|r| LastRunLine {
                run_id: &r.run_id,
                stage: r.stage,
                outcome: &r.outcome,
                updated_at: r.updated_at,
                verdict: status.last_verdict.as_deref(),
            }),
            remote_jobs: remote_jobs.remove(label.as_str()).unwrap_or_default(),
        })
        .collect();
    match cli.output {
        OutputFormat::Json => output::print_json(&lines)?,
        OutputFormat::Text => {
            // One buffer for the table: `println!` flushes stdout per line,
            // a write(2) per label.
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            writeln!(
                out,
                "{:<16} {:>9}  {:<26} {:<22} {:<18} LAST VERDICT",
                "LABEL", "THRESHOLD", "WATERMARK", "LAST VERSION", "LAST RUN"
            )
            .context("writing the status table")?;
            for line in &lines {
                let run = line.last_run.as_ref().map_or_else(
                    || "-".to_owned(),
                    |last| format!("{} ({})", last.outcome, output::cell(&last.stage)),
                );
                let mut waiting = line
                    .awaiting_approval
                    .map(|id| format!(" [awaiting approval: {id}]"))
                    .unwrap_or_default();
                if let Some(rejected) = line.rejected_version {
                    waiting.push_str(&format!(
                        " [dataset check rejected: {}]",
                        output::cell(rejected)
                    ));
                }
                writeln!(
                    out,
                    "{:<16} {:>9}  {:<26} {:<22} {:<18} {}{}",
                    line.label.as_str(),
                    line.threshold,
                    output::cell(&line.watermark),
                    output::cell(&line.last_version),
                    run,
                    output::cell(&line.last_run.as_ref().and_then(|last| last.verdict)),
                    waiting
                )
                .context("writing the status table")?;
            }
            let jobs = lines
                .iter()
                .map(|line| (line.label.as_str(), line.remote_jobs.as_slice()));
            if let Some(table) = output::remote_jobs_table(jobs) {
                write!(out, "\n{table}").context("writing the status table")?;
            }
            out.flush().context("writing the status table")?;
        }
    }
    Ok(exit::OK)
}

/// Runs parked in `awaiting_approval` (of `label`, or of every label),
/// newest first.
async fn waiting_approvals(
    store: &dyn RunStore,
    label: Option<Label>,
) -> Result<Vec<retrain_core::journal::RunDetail>, Failure> {
    let runs = store
        .list_runs(&RunFilter { label, limit: None })
        .await
        .context("listing runs")?;
    let mut waiting = Vec::new();
    for summary in runs
        .iter()
        .filter(|r| r.stage == retrain_core::machine::Stage::AwaitingApproval)
    {
        if let Some(detail) = store.run(&summary.run_id).await.context("reading run")? {
            waiting.push(detail);
        }
    }
    Ok(waiting)
}

async fn approvals(cli: &Cli, raw_labels: &[String]) -> Result<u8, Failure> {
    let loaded = load(cli, false)?;
    let store = reading_store(&loaded).await?;
    let wanted = parse_labels(raw_labels)?;
    let rows: Vec<_> = waiting_approvals(store.as_ref(), None)
        .await?
        .into_iter()
        .filter(|d| wanted.is_empty() || wanted.contains(&d.summary.label))
        .map(|d| {
            json!({
                "run_id": d.summary.run_id,
                "label": d.summary.label,
                "candidate": d.snapshot.candidate.as_ref().map(|c| &c.id),
                "verdict": d.snapshot.verdict.as_ref().map(|v| &v.reason),
                "since": d.summary.updated_at,
            })
        })
        .collect();
    match cli.output {
        OutputFormat::Json => output::print_json(&rows)?,
        OutputFormat::Text if rows.is_empty() => println!("no runs awaiting approval"),
        OutputFormat::Text => {
            println!(
                "{:<38} {:<16} {:<20} {:<26} VERDICT",
                "RUN", "LABEL", "CANDIDATE", "SINCE"
            );
            let s = |v: &serde_json::Value| match v {
                serde_json::Value::Null => "-".to_owned(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            for row in &rows {
                println!(
                    "{:<38} {:<16} {:<20} {:<26} {}",
                    s(&row["run_id"]),
                    s(&row["label"]),
                    s(&row["candidate"]),
                    s(&row["since"]),
                    s(&row["verdict"])
                );
            }
        }
    }
    Ok(exit::OK)
}

async fn runs_list(cli: &Cli, label: Option<&str>, limit: u32) -> Result<u8, Failure> {
    let loaded = load(cli, false)?;
    let store = reading_store(&loaded).await?;
    let label = label
        .map(Label::new)
        .transpose()
        .map_err(|e| config_failure(format!("--label: {e}")))?;
    let runs = store
        .list_runs(&RunFilter {
            label,
            limit: Some(limit),
        })
        .await
        .context("listing runs")?;
    match cli.output {
        OutputFormat::Json => output::print_json(&runs)?,
        OutputFormat::Text => {
            println!(
                "{:<38} {:<16} {:<18} {:<10} STARTED",
                "RUN", "LABEL", "STAGE", "OUTCOME"
            );
            for r in runs {
                println!(
                    "{:<38} {:<16} {:<18} {:<10} {}",
                    r.run_id.as_str(),
                    r.label.as_str(),
                    r.stage.as_str(),
                    r.outcome,
                    r.started_at.to_rfc3339()
                );
            }
        }
    }
    Ok(exit::OK)
}

async fn decide(cli: &Cli, args: &crate::args::DecideArgs, approve: bool) -> Result<u8, Failure> {
    use retrain_core::engine::{Decision, DecisionOutcome};
    if !approve && args.reason.as_deref().is_none_or(str::is_empty) {
        return Err(config_failure("reject needs --reason TEXT"));
    }
    if !approve && args.regate {
        return Err(config_failure("--regate applies to approve only"));
    }
    let by = actor(args.as_name.as_deref(), "decides")?;
    let loaded = load(cli, false)?;
    let store = store(&loaded).await?;
    let engine = wiring::build_engine(&loaded, store.clone())
        .await
        .map_err(config_failure)?;
    let decision = if approve {
        Decision::Approve {
            regate: args.regate,
        }
    } else {
        Decision::Reject
    };
    let outcome = engine
        .decide(
            &RunId(args.run_id.clone()),
            decision,
            &by,
            args.reason.clone(),
        )
        .await?;
    match outcome {
        DecisionOutcome::AlreadyApproved { by, at } => {
            let text = format!(
                "run {} already approved by {by} at {}",
                args.run_id,
                at.to_rfc3339()
            );
            match cli.output {
                OutputFormat::Json => output::print_json(&json!({
                    "run_id": args.run_id, "already_approved": true, "by": by, "at": at,
                }))?,
                OutputFormat::Text => println!("{text}"),
            }
            Ok(exit::OK)
        }
        DecisionOutcome::Applied(report) => {
            let runs = report.run_id.iter();
            write_manifests(store.as_ref(), &loaded.settings.state_dir, runs).await;
            match cli.output {
                OutputFormat::Json => output::print_json(&report)?,
                OutputFormat::Text => println!(
                    "{}: {} — {}",
                    report.label,
                    report.status.as_str(),
                    output::detail(&report)
                ),
            }
            Ok(
                if report.status == retrain_core::report::LabelStatus::Failed {
                    exit::LABEL_FAILED
                } else {
                    exit::OK
                },
            )
        }
    }
}

/// Who acts: `--as`, else `$GITHUB_ACTOR`, else `$USER`.
fn actor(as_name: Option<&str>, verb: &str) -> Result<String, Failure> {
    as_name
        .map(str::to_owned)
        .or_else(|| std::env::var("GITHUB_ACTOR").ok())
        .or_else(|| std::env::var("USER").ok())
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| config_failure(format!("say who {verb} with --as NAME ($USER is not set)")))
}

async fn rollback(cli: &Cli, args: &crate::args::RollbackArgs) -> Result<u8, Failure> {
    use retrain_core::engine::{EngineError, RollbackRequest};
    let label = Label::new(&args.label).map_err(|e| config_failure(format!("--label: {e}")))?;
    if args.reason.trim().is_empty() {
        return Err(config_failure("rollback needs --reason TEXT"));
    }
    if args.to.as_deref().is_some_and(|v| v.trim().is_empty()) {
        return Err(config_failure("--to needs a registry version"));
    }
    let by = actor(args.as_name.as_deref(), "rolls back")?;
    let loaded = load(cli, false)?;
    let store = store(&loaded).await?;
    let engine = wiring::build_engine(&loaded, store)
        .await
        .map_err(config_failure)?;
    let request = RollbackRequest {
        label,
        to_version: args.to.clone(),
        by,
        reason: args.reason.clone(),
        force: args.force,
    };
    let outcome = match engine.rollback(request).await {
        Ok(outcome) => outcome,
        // A refusal is the caller's mistake (like a bad flag): exit 2.
        Err(error @ (EngineError::RollbackRefused(_) | EngineError::UnknownLabel(..))) => {
            return Err(Failure {
                code: exit::CONFIG,
                error: anyhow::anyhow!("rollback refused: {error}"),
            })
        }
        Err(error) => return Err(error.into()),
    };
    let report = &outcome.report;
    match cli.output {
        OutputFormat::Json => output::print_json(&outcome)?,
        OutputFormat::Text => {
            if outcome.resumed {
                println!(
                    "completed the interrupted rollback run {} first; this request was not applied (run it again if still needed)",
                    report.run_id.as_ref().map_or("?", |r| r.as_str())
                );
            }
            println!(
                "{}: {} — {}",
                report.label,
                report.status.as_str(),
                output::detail(report)
            );
            if let Some(run_id) = &report.run_id {
                println!(
                    "run {run_id}; `retrain history --label {}` shows the lineage",
                    report.label
                );
            }
        }
    }
    Ok(if report.status == LabelStatus::RolledBack {
        exit::OK
    } else {
        exit::LABEL_FAILED
    })
}

async fn history(cli: &Cli, label: &str) -> Result<u8, Failure> {
    let loaded = load(cli, false)?;
    let label = Label::new(label).map_err(|e| config_failure(format!("--label: {e}")))?;
    let store = reading_store(&loaded).await?;
    let events = store
        .promotions(&label)
        .await
        .with_context(|| format!("reading the promotion history of label {label}"))?;
    match cli.output {
        OutputFormat::Json => output::print_json(&events)?,
        OutputFormat::Text => {
            if events.is_empty() {
                println!("label {label}: no promotion recorded");
            }
            for line in output::history_lines(&events) {
                println!("{line}");
            }
        }
    }
    Ok(exit::OK)
}

async fn runs_show(cli: &Cli, id: &str, format: ShowFormat) -> Result<u8, Failure> {
    let loaded = load(cli, false)?;
    let store = reading_store(&loaded).await?;
    let Some(detail) = store
        .run(&RunId(id.to_owned()))
        .await
        .context("reading the run")?
    else {
        return Err(Failure {
            code: exit::LABEL_FAILED,
            error: anyhow::anyhow!("no run with id {id}"),
        });
    };
    let format = if cli.output == OutputFormat::Json {
        ShowFormat::Json
    } else {
        format
    };
    let report = if format == ShowFormat::Md {
        retrain_core::history::stored_run_report(store.as_ref(), &detail)
            .await
            .context("reading the metrics history")?
    } else {
        retrain_core::report::LabelReport::from_run(&detail.snapshot, false)
    };
    match format {
        ShowFormat::Json => {
            let mut value = serde_json::to_value(&detail).context("rendering the run")?;
            value["manifest"] = serde_json::to_value(ManifestDocument::from_run(&detail.snapshot))
                .context("rendering the manifest")?;
            output::print_json(&value)?
        }
        ShowFormat::Md => {
            print!("{}", retrain_core::manifest::run_markdown(&detail, &report));
        }
        ShowFormat::Text => {
            println!(
                "run {} label {} stage {} outcome {}",
                detail.summary.run_id,
                detail.summary.label,
                detail.summary.stage,
                detail.summary.outcome
            );
            println!("{}", output::detail(&report));
            for t in &detail.transitions {
                println!(
                    "  #{:<3} {} {:>16} -> {:<16} {}",
                    t.seq,
                    t.at.to_rfc3339(),
                    t.from.as_str(),
                    t.to.as_str(),
                    t.event.get("event").and_then(|e| e.as_str()).unwrap_or("?")
                );
            }
        }
    }
    Ok(exit::OK)
}

/// `retrain metrics`: the label's evaluated candidates, oldest first.
async fn metrics(cli: &Cli, args: &MetricsArgs) -> Result<u8, Failure> {
    let loaded = load(cli, false)?;
    let label = Label::new(&args.label).map_err(|e| config_failure(format!("--label: {e}")))?;
    let store = reading_store(&loaded).await?;
    let points = retrain_core::history::metric_points(store.as_ref(), &label, args.limit)
        .await
        .context("reading the metrics history")?;
    if cli.output == OutputFormat::Json || args.format == MetricsFormat::Json {
        output::print_json(&points)?;
    } else {
        print!("{}", retrain_core::report::metrics_csv(&points));
    }
    Ok(exit::OK)
}

async fn gate(cli: &Cli, args: &GateArgs) -> Result<u8, Failure> {
    let loaded = load(cli, false)?;
    let label = Label::new(&args.label).map_err(|e| config_failure(format!("--label: {e}")))?;
    // The evaluation is journaled (a forced pass must be on record).
    let store = store(&loaded).await?;
    let engine = wiring::build_control_engine(&loaded, store.clone())
        .await
        .map_err(config_failure)?;
    let outcome = engine
        .gate_candidate(&label, &args.candidate, args.force, true)
        .await
        .map_err(|e| match e {
            retrain_core::engine::EngineError::UnknownLabel(..)
            | retrain_core::engine::EngineError::NoGate(_)
            | retrain_core::engine::EngineError::NoRegistry(_) => config_failure(e),
            other => Failure::from(anyhow::Error::new(other)),
        })?;
    let runs = outcome.run_id.iter();
    write_manifests(store.as_ref(), &loaded.settings.state_dir, runs).await;
    let production = outcome.production.as_ref();
    match cli.output {
        OutputFormat::Json => output::print_json(&json!({
            "label": label,
            "candidate": outcome.candidate,
            "production": production,
            "verdict": outcome.verdict,
            "run_id": outcome.run_id,
        }))?,
        OutputFormat::Text => {
            println!(
                "gate {} candidate {} vs production {}",
                label,
                outcome.candidate.id,
                production.map(|p| p.version.as_str()).unwrap_or("(none)")
            );
            output::print_verdict(&mut std::io::stdout().lock(), &outcome.verdict);
            if let Some(run_id) = &outcome.run_id {
                println!("recorded as run {run_id}");
            }
        }
    }
    if output::in_github_actions() {
        output::github_gate_outputs(&outcome.verdict, production.map(|p| p.version.as_str()))?;
    }
    if args.fail_on_reject && !outcome.verdict.passed {
        return Ok(exit::GATE_REJECTED);
    }
    Ok(exit::OK)
}

async fn infra(cli: &Cli, command: &InfraCommand) -> Result<u8, Failure> {
    let loaded = load(cli, false)?;
    match command {
        InfraCommand::Reap { force } => {
            let store = store(&loaded).await?;
            let engine = wiring::build_control_engine(&loaded, store)
                .await
                .map_err(config_failure)?;
            let reaped = engine.reap_leases(*force).await.context("reaping leases")?;
            match cli.output {
                OutputFormat::Json => output::print_json(&reaped)?,
                OutputFormat::Text => {
                    if reaped.is_empty() {
                        println!("no stale leases");
                    }
                    for lease in reaped {
                        println!(
                            "stopped lease {} ({}) of label {}: {}",
                            lease.id,
                            lease.provider,
                            lease.label,
                            lease.resources.join(", ")
                        );
                    }
                }
            }
            Ok(exit::OK)
        }
        InfraCommand::Start { label } | InfraCommand::Stop { label } => {
            let label = Label::new(label).map_err(|e| config_failure(format!("--label: {e}")))?;
            let start = matches!(command, InfraCommand::Start { .. });
            let states = wiring::infra_control(&loaded.settings, &label, start)
                .await
                .map_err(|e| Failure::from(anyhow::anyhow!("{e}")))?;
            for (id, state) in states {
                println!("{id}: {state}");
            }
            Ok(exit::OK)
        }
        InfraCommand::Status { label } => {
            let label = label
                .as_deref()
                .map(Label::new)
                .transpose()
                .map_err(|e| config_failure(format!("--label: {e}")))?;
            let store = reading_store(&loaded).await?;
            let leases = store.active_leases().await.context("reading leases")?;
            let states = wiring::infra_status(&loaded.settings, label.as_ref())
                .await
                .map_err(|e| Failure::from(anyhow::anyhow!("{e}")))?;
            match cli.output {
                OutputFormat::Json => output::print_json(&json!({
                    "instances": states,
                    "active_leases": leases,
                }))?,
                OutputFormat::Text => {
                    for (label, id, state) in &states {
                        println!("{label:<16} {id:<22} {state}");
                    }
                    for lease in &leases {
                        println!(
                            "active lease {} label {} since {} (max until {})",
                            lease.id, lease.label, lease.acquired_at, lease.max_until
                        );
                    }
                }
            }
            Ok(exit::OK)
        }
    }
}

/// At most this many label names in `config check`'s text line (the JSON
/// output lists them all).
const LABELS_LISTED: usize = 20;

/// `a, b, c`, or the first [`LABELS_LISTED`] and how many more: one line
/// for a terminal even with 10,000 labels.
fn label_list(labels: &[&str]) -> String {
    let listed = labels[..labels.len().min(LABELS_LISTED)].join(", ");
    match labels.len().checked_sub(LABELS_LISTED) {
        Some(more) if more > 0 => format!("{listed}, … and {more} more (--output json lists all)"),
        _ => listed,
    }
}

fn config(cli: &Cli, command: &ConfigCommand) -> Result<u8, Failure> {
    let loaded = load(cli, false)?;
    match command {
        ConfigCommand::Check => {
            let labels: Vec<&str> = loaded.settings.labels.keys().map(Label::as_str).collect();
            match cli.output {
                OutputFormat::Json => output::print_json(&json!({
                    "ok": true,
                    "file": loaded.file,
                    "labels": labels,
                    "config_hash": loaded.config_hash(),
                }))?,
                OutputFormat::Text => {
                    println!(
                        "configuration OK ({}): {} label(s): {}",
                        loaded
                            .file
                            .as_ref()
                            .map(|f| f.display().to_string())
                            .unwrap_or_else(|| "no file, env only".into()),
                        labels.len(),
                        label_list(&labels)
                    );
                    if labels.is_empty() {
                        println!("warning: no labels configured: `retrain run` will do nothing");
                    }
                }
            }
        }
        ConfigCommand::Show => {
            let text = settings::redacted_toml(&loaded.effective()).map_err(config_failure)?;
            match cli.output {
                OutputFormat::Json => {
                    let value: toml::Value = toml::from_str(&text).context("re-reading config")?;
                    output::print_json(&value)?
                }
                OutputFormat::Text => print!("{text}"),
            }
        }
    }
    Ok(exit::OK)
}
