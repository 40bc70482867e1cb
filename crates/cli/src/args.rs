//! Command-line arguments (the "low" stage: pure parsing, no I/O).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "retrain",
    version,
    about = "Retrain a model when enough new labelled mistakes pile up, and promote it only if it is better.",
    propagate_version = true
)]
pub struct Cli {
    /// Config file (default ./retrain.toml if it exists).
    #[arg(long, global = true, env = "RETRAIN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override the RunStore URL (`state`).
    #[arg(long, global = true, value_name = "URL")]
    pub state: Option<String>,
    /// Output format of reports on stdout.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "RETRAIN_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (e.g. `info`, `retrain=debug`); default from RETRAIN_LOG or `info`.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log: Option<String>,
    /// Also write JSONL logs per stage to DIR/<stage>.log (seed 004's layout).
    #[arg(long, global = true, value_name = "DIR", env = "RETRAIN_LOG_DIR")]
    pub log_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one full cycle: count, prepare, await dataset, train, gate, promote.
    Run(RunArgs),
    /// What `run` would do and why, changing nothing (= run --dry-run).
    Plan(LabelsArg),
    /// State per label: watermark, last consumed version, running stage, last verdict.
    Status(LabelsArg),
    /// Run history from the RunStore.
    Runs(RunsArgs),
    /// Production lineage of a label: every promotion and rollback, with who and why.
    History(HistoryArgs),
    /// Promote a candidate waiting in awaiting_approval (exactly once).
    Approve(DecideArgs),
    /// Close a candidate waiting in awaiting_approval without promoting it.
    Reject(DecideArgs),
    /// Runs waiting in awaiting_approval, across labels (newest first).
    Approvals(LabelsArg),
    /// Move a label's production back to the previous (or the given) version, as a journaled run.
    Rollback(RollbackArgs),
    /// The quality gate alone for a candidate (usable as a CI step).
    Gate(GateArgs),
    /// Metrics history of a label for charting: one row per evaluated candidate.
    Metrics(MetricsArgs),
    /// EC2 lease control.
    Infra(InfraArgs),
    /// Validate or print the effective configuration.
    Config(ConfigArgs),
    /// Create or upgrade the RunStore schema.
    Migrate,
    /// Run a worker agent: pull training jobs from retrain-server and run them here
    /// (token from RETRAIN_WORKER_TOKEN; see docs/workers.md).
    Worker(WorkerArgs),
    /// The workers registered with retrain-server, and its job queue.
    Workers(WorkersArgs),
    /// Print a shell completion script (e.g. `retrain completions bash > /etc/bash_completion.d/retrain`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct LabelsArg {
    /// Only these labels (repeatable).
    #[arg(long = "label", value_name = "LABEL")]
    pub labels: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub labels: LabelsArg,
    /// Reads only: no restart, no training, no promotion, nothing journaled.
    #[arg(long)]
    pub dry_run: bool,
    /// Exit 3 when a gate rejected a candidate.
    #[arg(long)]
    pub fail_on_reject: bool,
    /// Do not stop stale EC2 leases before the cycle.
    #[arg(long)]
    pub no_reap: bool,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    #[command(subcommand)]
    pub command: Option<RunsCommand>,
    #[arg(long = "label", value_name = "LABEL")]
    pub label: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
}

#[derive(Debug, Args)]
pub struct DecideArgs {
    /// The run awaiting approval (`retrain runs`).
    pub run_id: String,
    /// Why (journaled; required to reject).
    #[arg(long)]
    pub reason: Option<String>,
    /// Who decides (default: $GITHUB_ACTOR, then $USER).
    #[arg(long = "as", value_name = "NAME")]
    pub as_name: Option<String>,
    /// Approve only: gate the candidate again against the current production.
    #[arg(long)]
    pub regate: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[arg(long, value_name = "LABEL")]
    pub label: String,
    /// The registry version to restore (default: the production version before the current one).
    #[arg(long = "to", value_name = "VERSION")]
    pub to: Option<String>,
    /// Why (required; journaled, tagged on the rolled-back version, shown by `history`).
    #[arg(long)]
    pub reason: String,
    /// Who rolls back (default: $GITHUB_ACTOR, then $USER).
    #[arg(long = "as", value_name = "NAME")]
    pub as_name: Option<String>,
    /// Allow a version that never was production for this label.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[arg(long, value_name = "LABEL")]
    pub label: String,
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// One run with its full journal.
    Show {
        id: String,
        #[arg(long, value_enum, default_value_t = ShowFormat::Text)]
        format: ShowFormat,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShowFormat {
    Text,
    Json,
    Md,
}

#[derive(Debug, Args)]
pub struct MetricsArgs {
    #[arg(long, value_name = "LABEL")]
    pub label: String,
    /// `csv` (seed 004's `metrics/{task}.csv`) or `json`; `--output json` implies `json`.
    #[arg(long, value_enum, default_value_t = MetricsFormat::Csv)]
    pub format: MetricsFormat,
    /// Only the newest N candidates (default: all).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricsFormat {
    Csv,
    Json,
}

#[derive(Debug, Args)]
pub struct GateArgs {
    #[arg(long, value_name = "LABEL")]
    pub label: String,
    /// Candidate id in the registry (e.g. an MLflow run id).
    #[arg(long, value_name = "ID")]
    pub candidate: String,
    /// Override a rejection; recorded as forced.
    #[arg(long)]
    pub force: bool,
    /// Exit 3 when the gate rejects.
    #[arg(long)]
    pub fail_on_reject: bool,
}

#[derive(Debug, Args)]
pub struct InfraArgs {
    #[command(subcommand)]
    pub command: InfraCommand,
}

#[derive(Debug, Subcommand)]
pub enum InfraCommand {
    /// Start the label's instances (manual control, like the seed's ec2-control).
    Start {
        #[arg(long, value_name = "LABEL")]
        label: String,
    },
    /// Stop the label's instances.
    Stop {
        #[arg(long, value_name = "LABEL")]
        label: String,
    },
    /// Show instance states and recorded leases.
    Status {
        #[arg(long, value_name = "LABEL")]
        label: Option<String>,
    },
    /// Stop leases older than their `max` or left by a crashed process.
    Reap {
        /// Stop every active lease, even one a live process holds.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration (exit 2 with the key named on error).
    Check,
    /// Print the effective configuration with secrets as ***.
    Show,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The retrain-server base URL (outbound HTTP(S) is all the worker needs).
    #[arg(long, env = "RETRAIN_SERVER_URL", value_name = "URL")]
    pub server: String,
    /// The worker's name (default: this host's name).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Only accept jobs of these labels (default: any).
    #[arg(long, value_delimiter = ',', value_name = "LABEL,...")]
    pub labels: Vec<String>,
    /// Override detected resources, e.g. `gpu=2,gpu_memory=80G,memory=256G,cpus=16,tags=a100`.
    #[arg(long, value_name = "KEY=VALUE,...")]
    pub resources: Option<String>,
    /// Where jobs keep their state, log and artifacts while they run.
    #[arg(long, value_name = "DIR", default_value = ".retrain-worker")]
    pub work_dir: PathBuf,
    /// On SIGTERM/SIGINT, how long the running job may still take before it is
    /// cancelled and handed back to the queue.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub drain_timeout: String,
}

#[derive(Debug, Args)]
pub struct WorkersArgs {
    /// The retrain-server base URL (token: RETRAIN_SERVER_TOKEN or RETRAIN_WORKER_TOKEN).
    #[arg(long, env = "RETRAIN_SERVER_URL", value_name = "URL")]
    pub server: String,
}
