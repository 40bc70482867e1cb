//! The sans-IO state machine of one label's run: `step(state, event) -> actions`.
//!
//! Invariants (proven by `tests/machine_props.rs` in this crate):
//! - no I/O, no clock reads, no randomness: time arrives inside events;
//! - at most one `StartTraining` per `(label, version_tag)` that is not
//!   preceded by a `TrainingLost` of the previous attempt, never more than
//!   `max_attempts`;
//! - at most one `Promote` per run;
//! - a dry-run plan never emits a side-effecting action;
//! - `Done` with a consumed dataset always commits a cursor whose watermark is
//!   that dataset's `created_at`.
//!
//! The engine persists the state returned by [`LabelRun::step`] (with its
//! actions as `pending`) *before* executing any of the actions, so a crash at
//! any point resumes from the last persisted state by re-executing `pending`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{
    Candidate, CorrectRatio, CycleId, DatasetCheckResult, DatasetVersion, FeedbackCounts, JobKey,
    Label, LabelCursor, Lease, ProductionModel, PromotedVersion, RunId, SpaceStage, TrainingHandle,
    VersionTag,
};
use crate::gate::{self, GatePolicy, Verdict};

/// How a label decides that it needs retraining.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Seed 000: reviewed feedback counts from the `CountSource`.
    Counts {
        threshold: u64,
        correct_ratio: CorrectRatio,
    },
    /// Seeds 001/002: new samples in the published metadata.
    Metadata { threshold: u64 },
}

impl Trigger {
    pub fn threshold(&self) -> u64 {
        match self {
            Self::Counts { threshold, .. } | Self::Metadata { threshold } => *threshold,
        }
    }
}

/// Whether a passed verdict is promoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromoteMode {
    #[default]
    Auto,
    /// A passed verdict waits in `awaiting_approval` (cursor committed, lease
    /// released) until `retrain approve` / `retrain reject` decides.
    Manual,
    /// Record the verdict but never touch the registry.
    Disabled,
}

/// The per-label decisions a run is started with. Stored in the run so a
/// resumed run keeps the rules it started under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelPlan {
    pub label: Label,
    pub trigger: Trigger,
    /// Key of the prepare job (shared jobs are restarted once per cycle);
    /// `None`: nothing to restart.
    pub prepare: Option<String>,
    /// `None`: `gate = "none"`, the trainer decides itself.
    pub gate: Option<GatePolicy>,
    pub leased: bool,
    pub promote: PromoteMode,
    pub max_attempts: u32,
    /// How many cycles a step that failed transiently (registry, notifier or
    /// lease outage) is retried before the run fails. Journals written
    /// before this field existed read as the default.
    #[serde(default = "default_max_step_retries")]
    pub max_step_retries: u32,
    #[serde(with = "duration_ms")]
    pub poll_interval: Duration,
    #[serde(with = "duration_ms")]
    pub poll_timeout: Duration,
    pub dry_run: bool,
    /// `promote = "manual"`: how long a candidate waits for a decision
    /// before the next cycle expires it. Journals written before this field
    /// existed read as the default.
    #[serde(default = "default_approval_expires", with = "duration_ms")]
    pub approval_expires: Duration,
    /// Whether a `dataset_check` examines the accepted dataset version
    /// before the lease and the training.
    #[serde(default)]
    pub dataset_check: bool,
}

/// Default of [`LabelPlan::approval_expires`]: a week.
pub const DEFAULT_APPROVAL_EXPIRES: Duration = Duration::from_secs(7 * 24 * 3600);

fn default_approval_expires() -> Duration {
    DEFAULT_APPROVAL_EXPIRES
}

/// Default of [`LabelPlan::max_step_retries`].
pub const DEFAULT_MAX_STEP_RETRIES: u32 = 5;

fn default_max_step_retries() -> u32 {
    DEFAULT_MAX_STEP_RETRIES
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().min(u64::MAX as u128) as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Where a run is. Serialised names are part of the journal format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Created,
    Counting,
    Preparing,
    AwaitingDataset,
    Leasing,
    Training,
    Gating,
    Promoting,
    Releasing,
    Notifying,
    Finishing,
    /// `promote = "manual"`: the automatic part is over (lease released,
    /// notified, cursor committed); waiting for `Approved` / `Rejected`.
    AwaitingApproval,
    Done,
    /// A rollback run (`retrain rollback`): moving production back to an
    /// earlier version in the registry.
    RollingBack,
    /// The `dataset_check` examines the accepted dataset version (before
    /// any lease or training).
    Checking,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Counting => "counting",
            Self::Preparing => "preparing",
            Self::AwaitingDataset => "awaiting_dataset",
            Self::Leasing => "leasing",
            Self::Training => "training",
            Self::Gating => "gating",
            Self::Promoting => "promoting",
            Self::Releasing => "releasing",
            Self::Notifying => "notifying",
            Self::Finishing => "finishing",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Done => "done",
            Self::RollingBack => "rolling_back",
            Self::Checking => "checking",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Outcome {
    /// Below threshold (or no new version, for metadata-triggered labels).
    Skipped {
        measured: u64,
        threshold: u64,
        reason: String,
    },
    /// Dry-run: what a real run would do next.
    Planned {
        measured: u64,
        threshold: u64,
        would: String,
    },
    /// Trained without a gate (`gate = "none"`).
    Trained {
        candidate: Option<String>,
    },
    Promoted {
        version: String,
    },
    /// Gate passed but promotion is disabled.
    Passed,
    /// Gate passed; waiting for a human (`promote = "manual"`).
    AwaitingApproval,
    Rejected {
        reason: String,
    },
    Failed {
        stage: Stage,
        reason: String,
    },
    /// A rollback run moved production from `from` back to `to`.
    RolledBack {
        from: Option<String>,
        to: String,
    },
    /// The `dataset_check` rejected the accepted dataset version: nothing
    /// was leased or trained; the version is never checked again.
    DatasetRejected {
        version: VersionTag,
        reason: String,
    },
    /// A candidate awaiting approval was not decided within
    /// `approval_expires`; it can no longer be approved.
    Expired {
        reason: String,
    },
    /// A newer passed candidate of the same label (`by_run`) reached
    /// `awaiting_approval`; this one can no longer be approved.
    Superseded {
        by_run: RunId,
    },
}

impl Outcome {
    pub fn short(&self) -> &'static str {
        match self {
            Self::Skipped { .. } => "skipped",
            Self::Planned { .. } => "planned",
            Self::Trained { .. } => "trained",
            Self::Promoted { .. } => "promoted",
            Self::Passed => "passed",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Rejected { .. } => "rejected",
            Self::Failed { .. } => "failed",
            Self::RolledBack { .. } => "rolled_back",
            Self::DatasetRejected { .. } => "dataset_rejected",
            Self::Expired { .. } => "expired",
            Self::Superseded { .. } => "superseded",
        }
    }
    pub fn is_failure(&self) -> bool {
        matches!(self, Self::Failed { .. })
    }
}

/// Inputs to the machine: outcomes of actions, and time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Event {
    /// The engine holds the lock and starts (or resumes) the run.
    Started {
        now: DateTime<Utc>,
    },
    CountsRead {
        counts: FeedbackCounts,
    },
    /// The currently published dataset (read-only).
    PublishedRead {
        current: Option<DatasetVersion>,
    },
    PrepareRestarted {
        now: DateTime<Utc>,
    },
    /// One poll of the metadata (and of the prepare job's stage).
    Polled {
        now: DateTime<Utc>,
        dataset: Option<DatasetVersion>,
        prepare_stage: Option<SpaceStage>,
    },
    LeaseAcquired {
        lease: Lease,
    },
    /// A resumed run re-started the machines of its lease (they were stopped
    /// on interrupt or reaped); the pending actions stay the same.
    LeaseRenewed {
        lease: Lease,
    },
    TrainingStarted {
        handle: TrainingHandle,
    },
    TrainingFinished {
        candidate: Candidate,
    },
    TrainingLost {
        reason: String,
    },
    /// The job was stopped by us (Ctrl-C, SIGTERM, shutdown): it is started
    /// again on resume under a new job key, without counting an attempt.
    TrainingCancelled {
        reason: String,
    },
    BaselineRead {
        production: Option<ProductionModel>,
    },
    Promoted {
        version: PromotedVersion,
    },
    LeaseReleased,
    Notified {
        error: Option<String>,
    },
    Committed,
    /// `retrain gate` evaluated a candidate outside a cycle (possibly forced):
    /// recorded as a run of its own so the decision is in the journal.
    GateEvaluated {
        now: DateTime<Utc>,
        candidate: Candidate,
        production: Option<ProductionModel>,
        verdict: Verdict,
        /// A registered candidate announced by the registry (an MLflow
        /// webhook): a passed verdict goes on to promotion (or approval,
        /// `promote = "manual"`) and the run is notified like a cycle's.
        /// `false` (`retrain gate`): the verdict is only recorded.
        #[serde(default)]
        promote: bool,
    },
    /// The candidate of an `awaiting_approval` run was gated again against
    /// the current production (`retrain approve --regate`).
    Regated {
        production: Option<ProductionModel>,
        verdict: Verdict,
    },
    /// A human approved the waiting candidate: it is promoted (once).
    Approved {
        by: String,
        #[serde(default)]
        reason: Option<String>,
        at: DateTime<Utc>,
    },
    /// A human rejected the waiting candidate: closed without promoting.
    Rejected {
        by: String,
        reason: String,
        at: DateTime<Utc>,
    },
    /// A step with an outside dependency (reading the baseline, promoting,
    /// notifying, releasing the lease) failed transiently. The run stays at
    /// that step and the next cycle retries it, until
    /// `plan.max_step_retries` consecutive failures fail the run. `done`
    /// names the parts of the step that did succeed (notifiers already
    /// delivered), so a retry does not repeat them.
    StepDeferred {
        error: String,
        #[serde(default)]
        done: Vec<String>,
    },
    /// An action failed; the run fails (releasing any lease first).
    ActionFailed {
        reason: String,
    },
    /// `retrain rollback`: a new run that moves production back to
    /// `rollback.to_version` (validated by the engine before this event).
    RollbackRequested {
        rollback: Rollback,
    },
    /// The registry made the rollback's target version production again.
    RolledBack {
        version: PromotedVersion,
    },
    /// The `dataset_check` ran on the accepted dataset version.
    DatasetChecked {
        result: DatasetCheckResult,
    },
    /// The waiting candidate was not decided within `approval_expires`
    /// (checked by the engine at the label's next cycle).
    ApprovalExpired {
        at: DateTime<Utc>,
        /// Why, for the report ("awaiting approval since … ; approval_expires = 7d").
        reason: String,
    },
    /// A newer passed candidate of the same label (`by_run`) is awaiting
    /// approval: this older one is closed.
    Superseded {
        by_run: RunId,
        at: DateTime<Utc>,
    },
}

impl Event {
    /// The event's journal name (its serialised tag).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Started { .. } => "started",
            Self::CountsRead { .. } => "counts_read",
            Self::PublishedRead { .. } => "published_read",
            Self::PrepareRestarted { .. } => "prepare_restarted",
            Self::Polled { .. } => "polled",
            Self::LeaseAcquired { .. } => "lease_acquired",
            Self::LeaseRenewed { .. } => "lease_renewed",
            Self::TrainingStarted { .. } => "training_started",
            Self::TrainingFinished { .. } => "training_finished",
            Self::TrainingLost { .. } => "training_lost",
            Self::TrainingCancelled { .. } => "training_cancelled",
            Self::BaselineRead { .. } => "baseline_read",
            Self::Promoted { .. } => "promoted",
            Self::LeaseReleased => "lease_released",
            Self::Notified { .. } => "notified",
            Self::Committed => "committed",
            Self::GateEvaluated { .. } => "gate_evaluated",
            Self::Regated { .. } => "regated",
            Self::Approved { .. } => "approved",
            Self::Rejected { .. } => "rejected",
            Self::StepDeferred { .. } => "step_deferred",
            Self::ActionFailed { .. } => "action_failed",
            Self::RollbackRequested { .. } => "rollback_requested",
            Self::RolledBack { .. } => "rolled_back",
            Self::DatasetChecked { .. } => "dataset_checked",
            Self::ApprovalExpired { .. } => "approval_expired",
            Self::Superseded { .. } => "superseded",
        }
    }
}

/// Outputs of the machine, executed by the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    /// Read feedback counts since the watermark (batched across labels).
    ReadCounts {
        since: DateTime<Utc>,
    },
    /// Read the published metadata (read-only).
    ReadPublished,
    /// Restart the prepare job `key` (once per cycle for shared jobs).
    RestartPrepare {
        key: String,
    },
    /// Wait `delay_ms` (plus jitter), then read the metadata and, if
    /// `check_prepare`, the prepare job's stage.
    Poll {
        delay_ms: u64,
        check_prepare: bool,
    },
    AcquireLease {
        attempt: u32,
    },
    /// The intent to start training job `job_key`: journaled before the
    /// trainer is called, which is idempotent for the key.
    StartTraining {
        attempt: u32,
        version: VersionTag,
        #[serde(default)]
        job_key: Option<JobKey>,
    },
    AwaitTraining {
        attempt: u32,
        handle: TrainingHandle,
    },
    ReadBaseline,
    Promote {
        candidate: Candidate,
    },
    ReleaseLease {
        // Boxed: the largest payload by far, and every other action (a
        // waiting run holds one) would otherwise be as large.
        lease: Box<Lease>,
    },
    Notify,
    /// Persist the final state and, if given, advance the label's cursor.
    Commit {
        cursor: Option<LabelCursor>,
    },
    /// Make the earlier registry version `version` production again
    /// (idempotent per run id, like `Promote`).
    RollBack {
        version: String,
    },
    /// The intent to run the label's `dataset_check` on `version` as job
    /// `job_key`: journaled before the check runs; the check returns the
    /// recorded result of a key it already completed instead of running again.
    CheckDataset {
        version: VersionTag,
        job_key: JobKey,
    },
}

impl Action {
    /// Whether executing this action changes anything outside the journal.
    pub fn is_side_effect(&self) -> bool {
        matches!(
            self,
            Self::RestartPrepare { .. }
                | Self::AcquireLease { .. }
                | Self::StartTraining { .. }
                | Self::Promote { .. }
                | Self::ReleaseLease { .. }
                | Self::Notify
                | Self::Commit { .. }
                | Self::RollBack { .. }
                | Self::CheckDataset { .. }
        )
    }
}

/// A transition that the machine refuses (an event that cannot happen in
/// this stage). The engine treats it as a bug and fails the label loudly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event `{event}` is not valid in stage `{stage}`")]
pub struct InvalidTransition {
    pub stage: Stage,
    pub event: String,
}

/// What a run was started with, for audits (§9): which binary and which
/// effective configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RunManifest {
    pub binary_version: String,
    pub config_hash: String,
    /// Commit the binary was built from (`unknown` when built without git).
    #[serde(default)]
    pub git_sha: String,
    /// `rustc --version` at build time.
    #[serde(default)]
    pub rustc_version: String,
    /// `std::env::consts` OS and architecture of the orchestrator.
    #[serde(default)]
    pub os: String,
    /// The label's trainer as it describes itself (for command trainers,
    /// the command line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer: Option<String>,
    /// How the last training job ended as the trainer saw it (command
    /// trainers: `exit status N`), recorded by the engine with the
    /// transition that ends the wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer_exit: Option<String>,
    /// Who started the cycle that created the run, when someone did
    /// (`retrain-server`: the bearer token's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triggered_by: Option<String>,
}

/// A human decision on a candidate (`retrain approve` / `retrain reject`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub by: String,
    #[serde(default)]
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

/// What a rollback run restores, who asked and why (`retrain rollback`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    /// The registry version that becomes production again.
    pub to_version: String,
    /// Production when the rollback was requested (`None`: there was none).
    pub from_version: Option<String>,
    pub by: String,
    pub reason: String,
    /// `--force`: the target never was production for this label.
    #[serde(default)]
    pub forced: bool,
    pub at: DateTime<Utc>,
    /// The run whose promotion first made `to_version` production, if the
    /// promotion history knows it.
    #[serde(default)]
    pub restored_run: Option<RunId>,
    #[serde(default)]
    pub restored_candidate: Option<String>,
}

/// The full state of one label's run. Serialised as the journal snapshot.
///
/// The large fields that are set late in a run, or only in some runs
/// (dataset, lease, baseline, approval, rollback, dataset check), are
/// boxed: a cycle holds every label's run between its two phases, and
/// boxing them takes a waiting run from 1.9 to 1.2 KiB (issue 11: 10,000
/// labels' peak RSS). `Box` serialises as its content: the snapshot's JSON
/// is unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRun {
    pub run_id: RunId,
    pub cycle_id: CycleId,
    pub plan: LabelPlan,
    #[serde(default)]
    pub manifest: RunManifest,
    /// The cursor when the run started.
    pub cursor: LabelCursor,
    pub stage: Stage,
    pub seq: u64,
    pub started_at: Option<DateTime<Utc>>,
    pub counts: Option<FeedbackCounts>,
    /// `dataset_len` (counts) or new samples (metadata) measured at Count.
    pub measured: Option<u64>,
    /// Minimum `num_samples` a new dataset must have.
    pub required_len: u64,
    /// Recorded before the prepare restart: the version a new one must differ from.
    pub last_version: Option<VersionTag>,
    pub last_version_recorded: bool,
    pub wait_started_at: Option<DateTime<Utc>>,
    pub polls: u32,
    pub last_seen: Option<DatasetVersion>,
    pub dataset: Option<Box<DatasetVersion>>,
    /// Attempts counted against `max_attempts` (jobs lost or failed on
    /// their own; a cancelled job is not an attempt).
    pub attempt: u32,
    /// Training jobs started, cancelled ones included: numbers the job keys.
    #[serde(default)]
    pub starts: u32,
    /// Jobs we stopped ourselves (interrupts), for the report.
    #[serde(default)]
    pub cancelled_jobs: Vec<String>,
    pub lost_attempts: Vec<String>,
    pub handle: Option<TrainingHandle>,
    pub lease: Option<Box<Lease>>,
    pub lease_released: bool,
    pub candidate: Option<Candidate>,
    pub baseline: Option<Box<ProductionModel>>,
    pub verdict: Option<Verdict>,
    pub promoted: Option<PromotedVersion>,
    pub notify_error: Option<String>,
    /// Notifiers that already delivered this run's report.
    #[serde(default)]
    pub notified: Vec<String>,
    /// Consecutive transient failures of the current step.
    #[serde(default)]
    pub step_retries: u32,
    /// The last transient failure of the current step.
    #[serde(default)]
    pub step_error: Option<String>,
    /// Who approved the promotion by hand, and why (`promote = "manual"`);
    /// `None`: promoted automatically.
    #[serde(default)]
    pub approval: Option<Box<Approval>>,
    /// Set for a rollback run (`retrain rollback`): what it restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Box<Rollback>>,
    /// What the `dataset_check` found for the accepted dataset version.
    #[serde(default)]
    pub dataset_check: Option<Box<DatasetCheckResult>>,
    /// Whether the run already committed once (a run awaiting approval
    /// committed its cursor before waiting): later commits (after an
    /// approval, rejection, expiry or supersede) never write the cursor
    /// again, so a newer run's cursor is never moved back.
    #[serde(default)]
    pub cursor_committed: bool,
    /// Set once the outcome is known; `Done` follows after release/notify/commit.
    pub outcome: Option<Outcome>,
    /// Actions announced by the last transition and not yet confirmed.
    pub pending: Vec<Action>,
}

impl LabelRun {
    pub fn new(run_id: RunId, cycle_id: CycleId, plan: LabelPlan, cursor: LabelCursor) -> Self {
        Self {
            run_id,
            cycle_id,
            plan,
            manifest: RunManifest::default(),
            cursor,
            stage: Stage::Created,
            seq: 0,
            started_at: None,
            counts: None,
            measured: None,
            required_len: 0,
            last_version: None,
            last_version_recorded: false,
            wait_started_at: None,
            polls: 0,
            last_seen: None,
            dataset: None,
            attempt: 0,
            starts: 0,
            cancelled_jobs: Vec::new(),
            lost_attempts: Vec::new(),
            handle: None,
            lease: None,
            lease_released: false,
            candidate: None,
            baseline: None,
            verdict: None,
            promoted: None,
            notify_error: None,
            approval: None,
            rollback: None,
            dataset_check: None,
            cursor_committed: false,
            notified: Vec::new(),
            step_retries: 0,
            step_error: None,
            outcome: None,
            pending: Vec::new(),
        }
    }

    pub fn label(&self) -> &Label {
        &self.plan.label
    }

    /// Whether `version` is a new dataset for this run: not the one its
    /// prepare restart must replace, and not one the label consumed
    /// (whatever was published in between: no `(label, version)` is
    /// trained twice) or whose dataset check rejected it.
    pub fn is_new_version(&self, version: &VersionTag) -> bool {
        self.last_version.as_ref() != Some(version) && !self.cursor.has_seen(version)
    }

    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Whether the run waits for a human decision (`retrain approve`).
    pub fn is_awaiting_approval(&self) -> bool {
        self.stage == Stage::AwaitingApproval
    }

    /// The point in time after which waiting for a dataset fails.
    pub fn poll_deadline(&self) -> Option<DateTime<Utc>> {
        let started = self.wait_started_at?;
        let timeout = chrono::Duration::from_std(self.plan.poll_timeout).ok()?;
        Some(started + timeout)
    }

    /// Apply `event`; returns the actions to execute (also kept in `pending`).
    pub fn step(&mut self, event: &Event) -> Result<Vec<Action>, InvalidTransition> {
        let stage = self.stage;
        let actions = self.transition(event)?;
        if stage == Stage::AwaitingApproval {
            // It committed its cursor before it waited (also true of journals
            // written before `cursor_committed` existed): never again.
            self.cursor_committed = true;
        }
        if !matches!(event, Event::StepDeferred { .. }) || self.stage != stage {
            // Progress (or a failure) ends the current step's retry count.
            self.step_retries = 0;
            self.step_error = None;
        }
        self.seq += 1;
        self.pending = actions.clone();
        Ok(actions)
    }

    /// What kind of production change a promotion of this run is.
    pub fn promotion_kind(&self) -> crate::journal::PromotionKind {
        if self.rollback.is_some() {
            crate::journal::PromotionKind::Rollback
        } else {
            crate::journal::PromotionKind::Promotion
        }
    }

    /// The run that trained the candidate this run promotes (for a
    /// rollback: the run that first promoted the restored version, if known).
    pub fn candidate_run(&self) -> Option<&RunId> {
        match &self.rollback {
            Some(rollback) => rollback.restored_run.as_ref(),
            None => self.candidate.as_ref().map(|_| &self.run_id),
        }
    }

    /// The key of the current (or next) training job.
    pub fn job_key(&self) -> JobKey {
        JobKey::training(&self.run_id, self.starts.max(1))
    }

    /// Whether the run stopped at a step that failed transiently and will be
    /// retried by the next cycle.
    pub fn is_deferred(&self) -> bool {
        self.step_error.is_some() && !self.is_done()
    }

    fn invalid(&self, event: &Event) -> InvalidTransition {
        InvalidTransition {
            stage: self.stage,
            event: event.name().to_owned(),
        }
    }

    fn transition(&mut self, event: &Event) -> Result<Vec<Action>, InvalidTransition> {
        use Event as E;
        use Stage as S;

        if let E::ActionFailed { reason } = event {
            if self.stage == S::Done {
                return Err(self.invalid(event));
            }
            return Ok(self.fail(reason.clone()));
        }
        if let E::StepDeferred { error, done } = event {
            return self.defer(event, error, done);
        }
        if let E::LeaseRenewed { lease } = event {
            if self.lease.is_none() || matches!(self.stage, S::Done | S::AwaitingApproval) {
                return Err(self.invalid(event));
            }
            self.lease = Some(Box::new(lease.clone()));
            self.lease_released = false;
            return Ok(self.pending.clone());
        }

        match (self.stage, event) {
            (S::Created, E::Started { now }) => {
                self.started_at = Some(*now);
                self.stage = S::Counting;
                Ok(match self.plan.trigger {
                    Trigger::Counts { .. } => vec![Action::ReadCounts {
                        since: self.cursor.watermark_or_epoch(),
                    }],
                    Trigger::Metadata { .. } => vec![Action::ReadPublished],
                })
            }
            (
                S::Created,
                E::GateEvaluated {
                    now,
                    candidate,
                    production,
                    verdict,
                    promote,
                },
            ) => {
                self.started_at = Some(*now);
                self.candidate = Some(candidate.clone());
                self.baseline = production.clone().map(Box::new);
                self.verdict = Some(verdict.clone());
                if *promote {
                    // Nothing was trained on a dataset here either: the
                    // cursor stays (`next_cursor` needs a dataset).
                    if !verdict.passed {
                        return Ok(self.conclude(Outcome::Rejected {
                            reason: verdict.reason.clone(),
                        }));
                    }
                    return Ok(match self.plan.promote {
                        _ if self.plan.dry_run => self.conclude(Outcome::Passed),
                        PromoteMode::Disabled => self.conclude(Outcome::Passed),
                        PromoteMode::Manual => self.conclude(Outcome::AwaitingApproval),
                        PromoteMode::Auto => {
                            self.stage = S::Promoting;
                            vec![Action::Promote {
                                candidate: candidate.clone(),
                            }]
                        }
                    });
                }
                self.outcome = Some(if verdict.passed {
                    Outcome::Passed
                } else {
                    Outcome::Rejected {
                        reason: verdict.reason.clone(),
                    }
                });
                // Nothing was trained on a dataset here: no cursor moves.
                Ok(self.commit())
            }
            (S::Counting, E::CountsRead { counts }) => {
                let Trigger::Counts {
                    threshold,
                    correct_ratio,
                } = self.plan.trigger
                else {
                    return Err(self.invalid(event));
                };
                let dataset_len = counts.dataset_len(correct_ratio);
                self.counts = Some(*counts);
                self.measured = Some(dataset_len);
                self.required_len = dataset_len;
                if dataset_len < threshold {
                    return Ok(self.finish_with(Outcome::Skipped {
                        measured: dataset_len,
                        threshold,
                        reason: format!(
                            "dataset_len {dataset_len} (misclassified {} + sampled correct {}) is below threshold {threshold}",
                            counts.misclassified,
                            dataset_len - counts.misclassified
                        ),
                    }));
                }
                if self.plan.dry_run {
                    let would = match &self.plan.prepare {
                        Some(key) => format!(
                            "restart prepare job {key}, wait for a new dataset with >= {dataset_len} samples, then train"
                        ),
                        None => format!(
                            "wait for a new dataset with >= {dataset_len} samples, then train"
                        ),
                    };
                    return Ok(self.finish_with(Outcome::Planned {
                        measured: dataset_len,
                        threshold,
                        would,
                    }));
                }
                // Record the currently published version *before* restarting
                // the prepare job: a new dataset must differ from it.
                self.stage = S::Preparing;
                Ok(vec![Action::ReadPublished])
            }
            (S::Counting, E::PublishedRead { current }) => {
                let Trigger::Metadata { threshold } = self.plan.trigger else {
                    return Err(self.invalid(event));
                };
                self.last_seen = current.clone();
                let Some(current) = current else {
                    return Ok(self.finish_with(Outcome::Skipped {
                        measured: 0,
                        threshold,
                        reason: "no dataset metadata published yet".into(),
                    }));
                };
                let meta = &current.metadata;
                if self.cursor.consumed_version.as_ref() == Some(&meta.version_tag) {
                    self.measured = Some(0);
                    return Ok(self.finish_with(Outcome::Skipped {
                        measured: 0,
                        threshold,
                        reason: format!("version {} was already consumed", meta.version_tag),
                    }));
                }
                let rejected = self.cursor.rejected_version.as_ref() == Some(&meta.version_tag);
                if rejected && self.plan.prepare.is_none() {
                    // Nothing to prepare a new version with: wait for one.
                    self.measured = Some(0);
                    return Ok(self.finish_with(Outcome::Skipped {
                        measured: 0,
                        threshold,
                        reason: format!(
                            "version {} was rejected by the dataset check; waiting for a new version",
                            meta.version_tag
                        ),
                    }));
                }
                let new_samples = meta
                    .num_samples
                    .saturating_sub(self.cursor.consumed_num_samples.unwrap_or(0));
                self.measured = Some(new_samples);
                if new_samples < threshold {
                    return Ok(self.finish_with(Outcome::Skipped {
                        measured: new_samples,
                        threshold,
                        reason: format!(
                            "{new_samples} new samples in {} is below threshold {threshold}",
                            meta.version_tag
                        ),
                    }));
                }
                if self.plan.dry_run {
                    return Ok(self.finish_with(Outcome::Planned {
                        measured: new_samples,
                        threshold,
                        would: format!("train on dataset version {}", meta.version_tag),
                    }));
                }
                self.last_version = self.cursor.consumed_version.clone();
                self.last_version_recorded = true;
                match self.plan.prepare.clone() {
                    Some(key) => {
                        self.last_version = Some(meta.version_tag.clone());
                        self.required_len = meta.num_samples;
                        self.stage = S::Preparing;
                        Ok(vec![Action::RestartPrepare { key }])
                    }
                    None => Ok(self.dataset_ready(current.clone())),
                }
            }
            (S::Preparing, E::PublishedRead { current }) => {
                self.last_version = current.as_ref().map(|d| d.metadata.version_tag.clone());
                self.last_version_recorded = true;
                self.last_seen = current.clone();
                match self.plan.prepare.clone() {
                    Some(key) => Ok(vec![Action::RestartPrepare { key }]),
                    None => {
                        // Nothing to restart: wait for a version that differs
                        // from the last *consumed* one (maybe already there).
                        self.last_version = self.cursor.consumed_version.clone();
                        self.stage = S::AwaitingDataset;
                        self.wait_started_at = self.started_at;
                        Ok(self.evaluate_poll(current.clone(), None, self.started_at))
                    }
                }
            }
            (S::Preparing, E::PrepareRestarted { now }) => {
                self.stage = S::AwaitingDataset;
                self.wait_started_at = Some(*now);
                Ok(vec![Action::Poll {
                    delay_ms: 0,
                    check_prepare: true,
                }])
            }
            (
                S::AwaitingDataset,
                E::Polled {
                    now,
                    dataset,
                    prepare_stage,
                },
            ) => {
                self.polls += 1;
                if dataset.is_some() {
                    self.last_seen = dataset.clone();
                }
                Ok(self.evaluate_poll(dataset.clone(), prepare_stage.clone(), Some(*now)))
            }
            (S::Leasing, E::LeaseAcquired { lease }) => {
                self.lease = Some(Box::new(lease.clone()));
                self.lease_released = false;
                Ok(self.start_training())
            }
            (S::Training, E::TrainingStarted { handle }) => {
                self.handle = Some(handle.clone());
                Ok(vec![Action::AwaitTraining {
                    attempt: self.attempt,
                    handle: handle.clone(),
                }])
            }
            (S::Training, E::TrainingLost { reason }) => {
                self.lost_attempts
                    .push(format!("attempt {}: {reason}", self.attempt));
                self.handle = None;
                if self.attempt >= self.plan.max_attempts {
                    return Ok(self.fail(format!(
                        "training lost {} time(s), max_attempts = {} reached (last: {reason})",
                        self.lost_attempts.len(),
                        self.plan.max_attempts
                    )));
                }
                if self.plan.leased {
                    // The machine may have been stopped with the lost job.
                    self.stage = S::Leasing;
                    return Ok(vec![Action::AcquireLease {
                        attempt: self.attempt + 1,
                    }]);
                }
                Ok(self.start_training())
            }
            (S::Training, E::TrainingCancelled { reason }) => {
                self.cancelled_jobs
                    .push(format!("job {}: {reason}", self.job_key()));
                self.handle = None;
                // Not an attempt: the same attempt starts again under a new key.
                Ok(self.start_job())
            }
            (S::Training, E::TrainingFinished { candidate }) => {
                self.candidate = Some(candidate.clone());
                self.handle = None;
                if self.plan.gate.is_none() {
                    return Ok(self.conclude(Outcome::Trained {
                        candidate: Some(candidate.id.clone()).filter(|id| !id.is_empty()),
                    }));
                }
                self.stage = S::Gating;
                Ok(vec![Action::ReadBaseline])
            }
            (S::Gating, E::BaselineRead { production }) => {
                let (Some(policy), Some(candidate)) = (&self.plan.gate, &self.candidate) else {
                    return Err(self.invalid(event));
                };
                let verdict = gate::evaluate(
                    policy,
                    &candidate.metrics,
                    production.as_ref().map(|p| &p.metrics),
                );
                self.baseline = production.clone().map(Box::new);
                let passed = verdict.passed;
                let reason = verdict.reason.clone();
                self.verdict = Some(verdict);
                if !passed {
                    return Ok(self.conclude(Outcome::Rejected { reason }));
                }
                if self.plan.promote == PromoteMode::Disabled || self.plan.dry_run {
                    return Ok(self.conclude(Outcome::Passed));
                }
                if self.plan.promote == PromoteMode::Manual {
                    // Release, notify ("awaiting approval"), commit the cursor,
                    // then park in `AwaitingApproval`: no `Promote` without
                    // an `Approved` event.
                    return Ok(self.conclude(Outcome::AwaitingApproval));
                }
                self.stage = S::Promoting;
                Ok(vec![Action::Promote {
                    candidate: candidate.clone(),
                }])
            }
            (S::Promoting, E::Promoted { version }) => {
                self.promoted = Some(version.clone());
                Ok(self.conclude(Outcome::Promoted {
                    version: version.version.clone(),
                }))
            }
            (S::Releasing, E::LeaseReleased) => {
                self.lease_released = true;
                Ok(self.after_release())
            }
            (S::Notifying, E::Notified { error }) => {
                self.notify_error = error.clone();
                Ok(self.commit())
            }
            (S::Finishing, E::Committed) => {
                self.cursor_committed = true;
                self.stage = if self.outcome == Some(Outcome::AwaitingApproval) {
                    S::AwaitingApproval
                } else {
                    S::Done
                };
                Ok(Vec::new())
            }
            (
                S::AwaitingApproval,
                E::Regated {
                    production,
                    verdict,
                },
            ) => {
                self.baseline = production.clone().map(Box::new);
                self.verdict = Some(verdict.clone());
                if verdict.passed {
                    return Ok(Vec::new());
                }
                self.notified.clear();
                Ok(self.conclude(Outcome::Rejected {
                    reason: format!(
                        "re-gated against the current production: {}",
                        verdict.reason
                    ),
                }))
            }
            (S::AwaitingApproval, E::Approved { by, reason, at }) => {
                let Some(candidate) = self.candidate.clone() else {
                    return Err(self.invalid(event));
                };
                self.approval = Some(Box::new(Approval {
                    by: by.clone(),
                    reason: reason.clone(),
                    at: *at,
                }));
                // The promotion is reported afresh.
                self.notified.clear();
                self.notify_error = None;
                self.stage = S::Promoting;
                Ok(vec![Action::Promote { candidate }])
            }
            (S::AwaitingApproval, E::Rejected { by, reason, at: _ }) => {
                self.notified.clear();
                self.notify_error = None;
                Ok(self.conclude(Outcome::Rejected {
                    reason: format!("rejected by {by}: {reason}"),
                }))
            }
            (S::Created, E::RollbackRequested { .. }) if self.plan.dry_run => {
                // A dry run never acts: there is no dry-run rollback.
                Err(self.invalid(event))
            }
            (S::Created, E::RollbackRequested { rollback }) => {
                // A rollback trains nothing: no dataset, so `Commit` carries
                // no cursor and the label's consumed version stays consumed.
                self.started_at = Some(rollback.at);
                self.rollback = Some(Box::new(rollback.clone()));
                self.stage = S::RollingBack;
                Ok(vec![Action::RollBack {
                    version: rollback.to_version.clone(),
                }])
            }
            (S::RollingBack, E::RolledBack { version }) => {
                let Some(rollback) = &self.rollback else {
                    return Err(self.invalid(event));
                };
                let from = version.previous.clone().or(rollback.from_version.clone());
                self.promoted = Some(version.clone());
                Ok(self.conclude(Outcome::RolledBack {
                    from,
                    to: version.version.clone(),
                }))
            }
            (S::AwaitingApproval, E::ApprovalExpired { at: _, reason }) => {
                self.notified.clear();
                self.notify_error = None;
                Ok(self.conclude(Outcome::Expired {
                    reason: reason.clone(),
                }))
            }
            (S::AwaitingApproval, E::Superseded { by_run, at: _ }) => {
                if *by_run == self.run_id {
                    return Err(self.invalid(event));
                }
                self.notified.clear();
                self.notify_error = None;
                Ok(self.conclude(Outcome::Superseded {
                    by_run: by_run.clone(),
                }))
            }
            (S::Checking, E::DatasetChecked { result }) => {
                let Some(dataset) = &self.dataset else {
                    return Err(self.invalid(event));
                };
                let version = dataset.metadata.version_tag.clone();
                self.dataset_check = Some(Box::new(result.clone()));
                if result.passed {
                    return Ok(self.lease_or_train());
                }
                let why = result
                    .detail
                    .clone()
                    .or_else(|| result.report_md.as_ref().and_then(|r| first_line(r)))
                    .unwrap_or_else(|| "it reported passed = false".into());
                Ok(self.conclude(Outcome::DatasetRejected {
                    reason: format!("the dataset check rejected version {version}: {why}"),
                    version,
                }))
            }
            _ => Err(self.invalid(event)),
        }
    }

    /// Decide after a poll: fail fast, accept the dataset, time out, or poll again.
    fn evaluate_poll(
        &mut self,
        dataset: Option<DatasetVersion>,
        prepare_stage: Option<SpaceStage>,
        now: Option<DateTime<Utc>>,
    ) -> Vec<Action> {
        if let Some(SpaceStage::Error(stage)) = &prepare_stage {
            let job = self.plan.prepare.clone().unwrap_or_default();
            return self.fail(format!(
                "prepare job {job} is in error stage {stage}; not waiting for the poll timeout"
            ));
        }
        if let Some(candidate) = dataset {
            let meta = &candidate.metadata;
            if self.is_new_version(&meta.version_tag) && meta.num_samples >= self.required_len {
                return self.dataset_ready(candidate);
            }
        }
        if let (Some(now), Some(deadline)) = (now, self.poll_deadline()) {
            if now >= deadline {
                let seen = self
                    .last_seen
                    .as_ref()
                    .map(|d| {
                        format!(
                            "version={} num_samples={}",
                            d.metadata.version_tag, d.metadata.num_samples
                        )
                    })
                    .unwrap_or_else(|| "nothing published".into());
                return self.fail(format!(
                    "timed out after {}s waiting for a dataset newer than {} with >= {} samples (last seen: {seen})",
                    self.plan.poll_timeout.as_secs(),
                    self.last_version
                        .as_ref()
                        .map(VersionTag::as_str)
                        .unwrap_or("none"),
                    self.required_len
                ));
            }
        }
        self.stage = Stage::AwaitingDataset;
        vec![Action::Poll {
            delay_ms: self.plan.poll_interval.as_millis().min(u64::MAX as u128) as u64,
            check_prepare: self.plan.prepare.is_some(),
        }]
    }

    fn dataset_ready(&mut self, dataset: DatasetVersion) -> Vec<Action> {
        let version = dataset.metadata.version_tag.clone();
        self.dataset = Some(Box::new(dataset));
        if self.plan.dataset_check {
            // Before any lease or training: a rejected dataset costs nothing.
            self.stage = Stage::Checking;
            return vec![Action::CheckDataset {
                version,
                job_key: JobKey::dataset_check(&self.run_id),
            }];
        }
        self.lease_or_train()
    }

    /// The accepted (and checked) dataset: lease the machines, or train.
    fn lease_or_train(&mut self) -> Vec<Action> {
        if self.plan.leased {
            self.stage = Stage::Leasing;
            return vec![Action::AcquireLease {
                attempt: self.attempt + 1,
            }];
        }
        self.start_training()
    }

    /// A new attempt: counted against `max_attempts`.
    fn start_training(&mut self) -> Vec<Action> {
        self.attempt += 1;
        self.start_job()
    }

    /// The intent to start one more job for the current attempt.
    fn start_job(&mut self) -> Vec<Action> {
        let version = self
            .dataset
            .as_ref()
            .map(|d| d.metadata.version_tag.clone())
            .unwrap_or_else(|| VersionTag::new(""));
        self.starts += 1;
        self.stage = Stage::Training;
        vec![Action::StartTraining {
            attempt: self.attempt,
            version,
            job_key: Some(self.job_key()),
        }]
    }

    /// A transient failure of a step with an outside dependency: stay at the
    /// step (same pending actions) until `max_step_retries` failures.
    fn defer(
        &mut self,
        event: &Event,
        error: &str,
        done: &[String],
    ) -> Result<Vec<Action>, InvalidTransition> {
        let retryable = matches!(
            (self.stage, self.pending.first()),
            (Stage::Gating, Some(Action::ReadBaseline))
                | (Stage::Promoting, Some(Action::Promote { .. }))
                | (Stage::Notifying, Some(Action::Notify))
                | (Stage::Releasing, Some(Action::ReleaseLease { .. }))
                | (Stage::RollingBack, Some(Action::RollBack { .. }))
        );
        if !retryable {
            return Err(self.invalid(event));
        }
        for part in done {
            if !self.notified.contains(part) {
                self.notified.push(part.clone());
            }
        }
        self.step_retries += 1;
        if self.step_retries >= self.plan.max_step_retries {
            let tries = self.step_retries;
            return Ok(self.fail(format!(
                "{error} (failed {tries} time(s) in a row, max_step_retries = {})",
                self.plan.max_step_retries
            )));
        }
        self.step_error = Some(error.to_owned());
        Ok(self.pending.clone())
    }

    fn finish_with(&mut self, outcome: Outcome) -> Vec<Action> {
        self.outcome = Some(outcome);
        if self.plan.dry_run {
            // Dry-run writes nothing a real run would act on.
            self.stage = Stage::Done;
            return Vec::new();
        }
        self.commit()
    }

    /// The outcome is known: release the lease, then notify, then commit.
    fn conclude(&mut self, outcome: Outcome) -> Vec<Action> {
        self.outcome = Some(outcome);
        self.release_or_continue()
    }

    fn fail(&mut self, reason: String) -> Vec<Action> {
        let stage = self.stage;
        match self.stage {
            // A failure while releasing: keep the lease recorded as active so
            // `infra reap` stops it; never loop on release.
            Stage::Releasing => {
                self.outcome = Some(match self.outcome.take() {
                    Some(Outcome::Failed { stage, reason: r }) => Outcome::Failed {
                        stage,
                        reason: format!("{r}; and releasing the lease failed: {reason}"),
                    },
                    _ => Outcome::Failed {
                        stage,
                        reason: format!("releasing the lease failed: {reason}"),
                    },
                });
                self.lease_released = true;
                self.after_release()
            }
            Stage::Notifying => {
                self.notify_error = Some(reason);
                self.commit()
            }
            Stage::Finishing => {
                // The commit itself failed (the store): the outcome stands and
                // the commit stays pending, so a resumed run commits it. A run
                // is never left in a stage with nothing to do.
                let _ = reason;
                self.commit()
            }
            Stage::Done => Vec::new(),
            _ => {
                self.outcome = Some(Outcome::Failed { stage, reason });
                if self.plan.dry_run {
                    self.stage = Stage::Done;
                    return Vec::new();
                }
                self.release_or_continue()
            }
        }
    }

    fn release_or_continue(&mut self) -> Vec<Action> {
        match &self.lease {
            Some(lease) if !self.lease_released => {
                self.stage = Stage::Releasing;
                vec![Action::ReleaseLease {
                    lease: lease.clone(),
                }]
            }
            _ => self.after_release(),
        }
    }

    /// Only runs that trained, gated or failed get here (skips and plans
    /// finish directly), and all of those are notified.
    fn after_release(&mut self) -> Vec<Action> {
        self.stage = Stage::Notifying;
        vec![Action::Notify]
    }

    fn commit(&mut self) -> Vec<Action> {
        self.stage = Stage::Finishing;
        vec![Action::Commit {
            cursor: self.cursor_to_commit(),
        }]
    }

    /// The cursor the (first) commit writes: the consumed dataset after a
    /// training; the rejected version after a failed dataset check (the
    /// watermark and the consumed version unchanged); nothing otherwise,
    /// and nothing on any commit after the first (see `cursor_committed`).
    fn cursor_to_commit(&self) -> Option<LabelCursor> {
        if self.cursor_committed {
            return None;
        }
        if let Some(Outcome::DatasetRejected { version, .. }) = &self.outcome {
            return Some(LabelCursor {
                rejected_version: Some(version.clone()),
                ..self.cursor.clone()
            });
        }
        self.next_cursor()
    }

    /// The cursor to commit: advanced to the dataset iff a training consumed it
    /// (ran to a result), so no `(label, version)` is ever trained twice.
    ///
    /// The watermark only moves forward: a republished older snapshot under
    /// a new tag must not make the next count re-read feedback already used.
    pub fn next_cursor(&self) -> Option<LabelCursor> {
        let dataset = self.dataset.as_ref()?;
        self.candidate.as_ref()?;
        let watermark = self
            .cursor
            .watermark
            .map_or(dataset.metadata.created_at, |current| {
                current.max(dataset.metadata.created_at)
            });
        Some(LabelCursor {
            watermark: Some(watermark),
            consumed_version: Some(dataset.metadata.version_tag.clone()),
            consumed_num_samples: Some(dataset.metadata.num_samples),
            rejected_version: self.cursor.rejected_version.clone(),
        })
    }
}

/// The first non-empty line of `text` that is not a markdown heading (the
/// first heading if there is nothing else).
fn first_line(text: &str) -> Option<String> {
    let lines = || text.lines().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .find(|l| !l.starts_with('#'))
        .or_else(|| lines().next().map(|l| l.trim_start_matches('#').trim()))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DatasetMetadata;
    use crate::gate::GatePolicy;

    /// Issue 11: a cycle holds every label's run and its pending action
    /// between its two phases (10,000 at once at 10,000 labels).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_waiting_run_and_its_actions_stay_small() {
        let run = std::mem::size_of::<LabelRun>();
        assert!(run <= 1280, "LabelRun is {run} bytes");
        let action = std::mem::size_of::<Action>();
        assert!(action <= 96, "Action is {action} bytes");
    }

    pub(crate) fn plan(trigger: Trigger) -> LabelPlan {
        LabelPlan {
            label: Label::new("department").unwrap(),
            trigger,
            prepare: Some("prep".into()),
            gate: Some(GatePolicy::seed_default()),
            leased: false,
            promote: PromoteMode::Auto,
            max_attempts: 2,
            max_step_retries: 5,
            poll_interval: Duration::from_secs(60),
            poll_timeout: Duration::from_secs(1800),
            dry_run: false,
            approval_expires: DEFAULT_APPROVAL_EXPIRES,
            dataset_check: false,
        }
    }

    fn dataset(tag: &str, n: u64) -> DatasetVersion {
        DatasetVersion {
            metadata: DatasetMetadata {
                dataset_name: "owner/ds".into(),
                version_tag: VersionTag::new(tag),
                num_samples: n,
                created_at: "2025-10-30T11:53:01Z".parse().unwrap(),
                splits: None,
                extra: Default::default(),
            },
            revision: None,
        }
    }

    fn now(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn counts_trigger() -> Trigger {
        Trigger::Counts {
            threshold: 40,
            correct_ratio: CorrectRatio::default(),
        }
    }

    fn run(plan: LabelPlan) -> LabelRun {
        LabelRun::new(
            RunId::generate(),
            CycleId::generate(),
            plan,
            LabelCursor::default(),
        )
    }

    #[test]
    fn below_threshold_skips_and_commits_without_cursor() {
        let mut r = run(plan(counts_trigger()));
        assert_eq!(
            r.step(&Event::Started { now: now(0) }).unwrap(),
            vec![Action::ReadCounts {
                since: DateTime::<Utc>::UNIX_EPOCH
            }]
        );
        let actions = r
            .step(&Event::CountsRead {
                counts: FeedbackCounts {
                    misclassified: 10,
                    correct: 5,
                },
            })
            .unwrap();
        assert_eq!(actions, vec![Action::Commit { cursor: None }]);
        assert!(matches!(
            r.outcome,
            Some(Outcome::Skipped {
                measured: 15,
                threshold: 40,
                ..
            })
        ));
        r.step(&Event::Committed).unwrap();
        assert!(r.is_done());
    }

    #[test]
    fn full_happy_path_records_last_version_before_restart() {
        let mut r = run(plan(counts_trigger()));
        r.step(&Event::Started { now: now(0) }).unwrap();
        let a = r
            .step(&Event::CountsRead {
                counts: FeedbackCounts {
                    misclassified: 30,
                    correct: 100,
                },
            })
            .unwrap();
        assert_eq!(a, vec![Action::ReadPublished]);
        let a = r
            .step(&Event::PublishedRead {
                current: Some(dataset("v1", 500)),
            })
            .unwrap();
        assert_eq!(a, vec![Action::RestartPrepare { key: "prep".into() }]);
        assert_eq!(r.last_version, Some(VersionTag::new("v1")));
        r.step(&Event::PrepareRestarted { now: now(1) }).unwrap();
        // Same version, even with enough samples: never accepted.
        let a = r
            .step(&Event::Polled {
                now: now(2),
                dataset: Some(dataset("v1", 10_000)),
                prepare_stage: Some(SpaceStage::Running),
            })
            .unwrap();
        assert!(matches!(a[..], [Action::Poll { .. }]));
        // New version but too small.
        let a = r
            .step(&Event::Polled {
                now: now(3),
                dataset: Some(dataset("v2", 59)),
                prepare_stage: None,
            })
            .unwrap();
        assert!(matches!(a[..], [Action::Poll { .. }]));
        let a = r
            .step(&Event::Polled {
                now: now(4),
                dataset: Some(dataset("v2", 60)),
                prepare_stage: None,
            })
            .unwrap();
        assert_eq!(
            a,
            vec![Action::StartTraining {
                attempt: 1,
                version: VersionTag::new("v2"),
                job_key: Some(JobKey::training(&r.run_id, 1)),
            }]
        );
    }

    #[test]
    fn error_stage_fails_fast_and_timeout_fails() {
        let mut r = run(plan(counts_trigger()));
        r.step(&Event::Started { now: now(0) }).unwrap();
        r.step(&Event::CountsRead {
            counts: FeedbackCounts {
                misclassified: 50,
                correct: 0,
            },
        })
        .unwrap();
        r.step(&Event::PublishedRead { current: None }).unwrap();
        r.step(&Event::PrepareRestarted { now: now(0) }).unwrap();
        let a = r
            .step(&Event::Polled {
                now: now(1),
                dataset: None,
                prepare_stage: Some(SpaceStage::Error("BUILD_ERROR".into())),
            })
            .unwrap();
        assert_eq!(a, vec![Action::Notify]);
        match &r.outcome {
            Some(Outcome::Failed { reason, .. }) => assert!(reason.contains("BUILD_ERROR")),
            other => panic!("{other:?}"),
        }

        let mut r = run(plan(counts_trigger()));
        r.step(&Event::Started { now: now(0) }).unwrap();
        r.step(&Event::CountsRead {
            counts: FeedbackCounts {
                misclassified: 50,
                correct: 0,
            },
        })
        .unwrap();
        r.step(&Event::PublishedRead { current: None }).unwrap();
        r.step(&Event::PrepareRestarted { now: now(0) }).unwrap();
        let a = r
            .step(&Event::Polled {
                now: now(1800),
                dataset: None,
                prepare_stage: None,
            })
            .unwrap();
        assert_eq!(a, vec![Action::Notify]);
        match &r.outcome {
            Some(Outcome::Failed { reason, stage }) => {
                assert_eq!(*stage, Stage::AwaitingDataset);
                assert!(reason.contains("timed out"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_manual_gate_is_recorded_without_moving_the_cursor() {
        let mut r = run(plan(counts_trigger()));
        let verdict = crate::gate::evaluate(
            &GatePolicy::seed_default(),
            &[("dice".to_string(), 0.1), ("iou".to_string(), 0.1)]
                .into_iter()
                .collect(),
            None,
        );
        let actions = r
            .step(&Event::GateEvaluated {
                now: now(0),
                candidate: Candidate {
                    id: "run-1".into(),
                    metrics: Default::default(),
                },
                production: None,
                verdict: verdict.forced(),
                promote: false,
            })
            .unwrap();
        assert_eq!(actions, vec![Action::Commit { cursor: None }]);
        assert_eq!(r.outcome, Some(Outcome::Passed));
        assert!(r.verdict.as_ref().unwrap().forced);
    }

    /// A registered candidate (MLflow webhook) that passes is promoted
    /// (auto), parked for approval (manual) or only passed (disabled); one
    /// that fails is rejected; every path notifies and never moves the cursor.
    #[test]
    fn an_unapproved_candidate_expires_after_a_week_by_default() {
        assert_eq!(DEFAULT_APPROVAL_EXPIRES, Duration::from_secs(604_800));
    }

    #[test]
    fn a_registered_candidate_is_gated_then_promoted_or_parked() {
        let gated_in = |mode: PromoteMode, passed: bool, dry_run: bool| {
            let mut p = plan(counts_trigger());
            p.promote = mode;
            p.dry_run = dry_run;
            let mut r = run(p);
            let metrics = [("dice".to_string(), 0.9), ("iou".to_string(), 0.9)]
                .into_iter()
                .collect();
            let mut verdict = crate::gate::evaluate(&GatePolicy::seed_default(), &metrics, None);
            verdict.passed = passed;
            let candidate = Candidate {
                id: "models:/seg/3".into(),
                metrics,
            };
            let actions = r
                .step(&Event::GateEvaluated {
                    now: now(0),
                    candidate: candidate.clone(),
                    production: None,
                    verdict,
                    promote: true,
                })
                .unwrap();
            (r, actions, candidate)
        };
        let gated = |mode: PromoteMode, passed: bool| gated_in(mode, passed, false);
        // A dry run never promotes, even a passed candidate in auto mode.
        let (r, actions, _) = gated_in(PromoteMode::Auto, true, true);
        assert_eq!(actions, vec![Action::Notify]);
        assert_eq!(r.outcome, Some(Outcome::Passed));
        let (mut r, actions, candidate) = gated(PromoteMode::Auto, true);
        assert_eq!(actions, vec![Action::Promote { candidate }]);
        assert_eq!(r.stage, Stage::Promoting);
        let actions = r
            .step(&Event::Promoted {
                version: PromotedVersion {
                    version: "3".into(),
                    previous: Some("2".into()),
                },
            })
            .unwrap();
        assert_eq!(actions, vec![Action::Notify]);
        r.step(&Event::Notified { error: None }).unwrap();
        assert_eq!(r.pending, vec![Action::Commit { cursor: None }]);

        for (mode, passed, outcome) in [
            (PromoteMode::Manual, true, "awaiting_approval"),
            (PromoteMode::Disabled, true, "passed"),
            (PromoteMode::Auto, false, "rejected"),
        ] {
            let (r, actions, _) = gated(mode, passed);
            assert_eq!(actions, vec![Action::Notify], "{mode:?}");
            assert_eq!(r.outcome.as_ref().map(Outcome::short), Some(outcome));
        }
    }

    /// Drive a fresh run of `plan` over threshold to its first poll after
    /// the prepare restart (nothing was published before).
    fn polling(plan: LabelPlan) -> LabelRun {
        let mut r = run(plan);
        r.step(&Event::Started { now: now(0) }).unwrap();
        r.step(&Event::CountsRead {
            counts: FeedbackCounts {
                misclassified: 50,
                correct: 0,
            },
        })
        .unwrap();
        r.step(&Event::PublishedRead { current: None }).unwrap();
        r.step(&Event::PrepareRestarted { now: now(1) }).unwrap();
        r
    }

    /// Drive a fresh counts-triggered run to training of `v2`.
    fn training_run() -> LabelRun {
        let mut r = polling(plan(counts_trigger()));
        r.step(&Event::Polled {
            now: now(2),
            dataset: Some(dataset("v2", 60)),
            prepare_stage: None,
        })
        .unwrap();
        r
    }

    fn started(r: &mut LabelRun) {
        r.step(&Event::TrainingStarted {
            handle: TrainingHandle {
                kind: "t".into(),
                data: serde_json::json!({}),
            },
        })
        .unwrap();
    }

    fn finished(r: &mut LabelRun, dice: f64) -> Vec<Action> {
        r.step(&Event::TrainingFinished {
            candidate: Candidate {
                id: "c".into(),
                metrics: [("dice".to_string(), dice), ("iou".to_string(), 0.9)]
                    .into_iter()
                    .collect(),
            },
        })
        .unwrap()
    }

    #[test]
    fn a_cancelled_job_restarts_under_a_new_key_without_counting_an_attempt() {
        let mut r = training_run();
        assert_eq!((r.attempt, r.starts), (1, 1));
        started(&mut r);
        let a = r
            .step(&Event::TrainingCancelled {
                reason: "interrupted".into(),
            })
            .unwrap();
        assert_eq!(
            a,
            vec![Action::StartTraining {
                attempt: 1,
                version: VersionTag::new("v2"),
                job_key: Some(JobKey::training(&r.run_id, 2)),
            }]
        );
        assert_eq!((r.attempt, r.starts), (1, 2));
        assert!(r.handle.is_none());
        assert!(r.lost_attempts.is_empty());
        assert_eq!(r.cancelled_jobs.len(), 1);
        assert!(
            r.cancelled_jobs[0].contains("/train/1"),
            "{:?}",
            r.cancelled_jobs
        );
        // A cancellation outside training is refused.
        let mut idle = run(plan(counts_trigger()));
        assert!(idle
            .step(&Event::TrainingCancelled { reason: "x".into() })
            .is_err());
    }

    #[test]
    fn a_transient_failure_keeps_the_step_until_max_step_retries() {
        let mut r = training_run();
        started(&mut r);
        assert_eq!(finished(&mut r, 0.95), vec![Action::ReadBaseline]);
        let defer = Event::StepDeferred {
            error: "registry 503".into(),
            done: vec![],
        };
        for failure in 1..r.plan.max_step_retries {
            assert_eq!(r.step(&defer).unwrap(), vec![Action::ReadBaseline]);
            assert_eq!(r.stage, Stage::Gating);
            assert_eq!(r.step_retries, failure);
            assert_eq!(r.step_error.as_deref(), Some("registry 503"));
            assert!(r.is_deferred());
        }
        // The last allowed failure fails the run (notify, commit the cursor).
        let a = r.step(&defer).unwrap();
        assert_eq!(a, vec![Action::Notify]);
        match &r.outcome {
            Some(Outcome::Failed { stage, reason }) => {
                assert_eq!(*stage, Stage::Gating);
                assert!(reason.contains("max_step_retries = 5"), "{reason}");
                assert!(reason.contains("registry 503"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!r.is_deferred());
    }

    #[test]
    fn progress_resets_the_retry_count_and_a_deferral_elsewhere_is_refused() {
        let mut r = training_run();
        started(&mut r);
        // Deferral is only for steps with an outside dependency.
        assert!(r
            .step(&Event::StepDeferred {
                error: "x".into(),
                done: vec![]
            })
            .is_err());
        finished(&mut r, 0.95);
        r.step(&Event::StepDeferred {
            error: "503".into(),
            done: vec![],
        })
        .unwrap();
        assert_eq!(r.step_retries, 1);
        let a = r.step(&Event::BaselineRead { production: None }).unwrap();
        assert!(matches!(a[..], [Action::Promote { .. }]));
        assert_eq!(r.step_retries, 0);
        assert_eq!(r.step_error, None);
        // Notify: the notifiers that delivered are remembered, once each.
        r.step(&Event::Promoted {
            version: PromotedVersion {
                version: "1".into(),
                previous: None,
            },
        })
        .unwrap();
        assert_eq!(r.stage, Stage::Notifying);
        for _ in 0..2 {
            r.step(&Event::StepDeferred {
                error: "slack timed out".into(),
                done: vec!["github".into()],
            })
            .unwrap();
        }
        assert_eq!(r.notified, vec!["github".to_string()]);
        assert_eq!(r.step_retries, 2);
    }

    #[test]
    fn the_watermark_never_moves_backwards() {
        let mut r = training_run();
        // The label had consumed feedback up to a later time than the new
        // dataset claims (a republished older snapshot under a new tag).
        let later: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        r.cursor.watermark = Some(later);
        started(&mut r);
        finished(&mut r, 0.95);
        let cursor = r.next_cursor().unwrap();
        assert_eq!(cursor.watermark, Some(later));
        assert_eq!(cursor.consumed_version, Some(VersionTag::new("v2")));
        // An older watermark does move forward to the dataset's time.
        r.cursor.watermark = Some("2020-01-01T00:00:00Z".parse().unwrap());
        assert_eq!(
            r.next_cursor().unwrap().watermark,
            Some(r.dataset.as_ref().unwrap().metadata.created_at)
        );
    }

    #[test]
    fn a_failed_commit_stays_pending_and_done_is_final() {
        let mut r = run(plan(counts_trigger()));
        r.step(&Event::Started { now: now(0) }).unwrap();
        let a = r
            .step(&Event::CountsRead {
                counts: FeedbackCounts::default(),
            })
            .unwrap();
        assert_eq!(a, vec![Action::Commit { cursor: None }]);
        let outcome = r.outcome.clone();
        let again = r
            .step(&Event::ActionFailed {
                reason: "store down".into(),
            })
            .unwrap();
        assert_eq!(again, vec![Action::Commit { cursor: None }]);
        assert_eq!(r.stage, Stage::Finishing);
        assert_eq!(r.outcome, outcome, "the outcome stands");
        r.step(&Event::Committed).unwrap();
        assert!(r.is_done());
        assert!(r
            .step(&Event::ActionFailed {
                reason: "late".into()
            })
            .is_err());
    }

    #[test]
    fn event_names_match_the_journal_tags() {
        let events = [
            Event::Started { now: now(0) },
            Event::Committed,
            Event::LeaseReleased,
            Event::TrainingCancelled { reason: "r".into() },
            Event::StepDeferred {
                error: "e".into(),
                done: vec![],
            },
            Event::ActionFailed { reason: "r".into() },
            Event::Notified { error: None },
        ];
        for event in events {
            let tag = serde_json::to_value(&event).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned();
            assert_eq!(event.name(), tag);
        }
    }

    #[test]
    fn names_and_classifications_are_those_of_the_journal_format() {
        assert_eq!(counts_trigger().threshold(), 40);
        assert_eq!(Trigger::Metadata { threshold: 7 }.threshold(), 7);
        for stage in [
            Stage::Created,
            Stage::Counting,
            Stage::Preparing,
            Stage::AwaitingDataset,
            Stage::Leasing,
            Stage::Training,
            Stage::Gating,
            Stage::Promoting,
            Stage::Releasing,
            Stage::Notifying,
            Stage::Finishing,
            Stage::Done,
        ] {
            let serde_name = serde_json::to_value(stage).unwrap();
            assert_eq!(serde_name, stage.as_str());
            assert_eq!(stage.to_string(), stage.as_str());
        }
        let failed = Outcome::Failed {
            stage: Stage::Training,
            reason: "x".into(),
        };
        assert_eq!(failed.short(), "failed");
        assert!(failed.is_failure());
        let others = [
            (Outcome::Passed, "passed"),
            (Outcome::Trained { candidate: None }, "trained"),
            (
                Outcome::Promoted {
                    version: "1".into(),
                },
                "promoted",
            ),
            (Outcome::Rejected { reason: "r".into() }, "rejected"),
            (
                Outcome::Skipped {
                    measured: 0,
                    threshold: 1,
                    reason: "r".into(),
                },
                "skipped",
            ),
            (
                Outcome::Planned {
                    measured: 0,
                    threshold: 1,
                    would: "w".into(),
                },
                "planned",
            ),
        ];
        for (outcome, short) in others {
            assert_eq!(outcome.short(), short);
            assert!(!outcome.is_failure());
            let tag = serde_json::to_value(&outcome).unwrap()["kind"].clone();
            assert_eq!(tag, short);
        }
    }

    #[test]
    fn side_effects_are_exactly_the_actions_that_change_the_world() {
        let lease = Lease {
            id: "l".into(),
            label: Label::new("x").unwrap(),
            run_id: RunId("r".into()),
            provider: "ec2".into(),
            resources: vec![],
            region: None,
            acquired_at: now(0),
            max_until: now(0),
            attributes: Default::default(),
            released_at: None,
        };
        let handle = TrainingHandle {
            kind: "t".into(),
            data: serde_json::json!({}),
        };
        let effects = [
            Action::RestartPrepare { key: "k".into() },
            Action::AcquireLease { attempt: 1 },
            Action::StartTraining {
                attempt: 1,
                version: VersionTag::new("v"),
                job_key: None,
            },
            Action::Promote {
                candidate: Candidate {
                    id: "c".into(),
                    metrics: Default::default(),
                },
            },
            Action::ReleaseLease {
                lease: Box::new(lease),
            },
            Action::Notify,
            Action::Commit { cursor: None },
        ];
        for action in &effects {
            assert!(action.is_side_effect(), "{action:?}");
        }
        let reads = [
            Action::ReadCounts { since: now(0) },
            Action::ReadPublished,
            Action::Poll {
                delay_ms: 1,
                check_prepare: true,
            },
            Action::AwaitTraining { attempt: 1, handle },
            Action::ReadBaseline,
        ];
        for action in &reads {
            assert!(!action.is_side_effect(), "{action:?}");
        }
    }

    #[test]
    fn journals_without_max_step_retries_read_as_the_default() {
        let mut json = serde_json::to_value(plan(counts_trigger())).unwrap();
        json.as_object_mut().unwrap().remove("max_step_retries");
        let plan: LabelPlan = serde_json::from_value(json).unwrap();
        assert_eq!(plan.max_step_retries, DEFAULT_MAX_STEP_RETRIES);
        assert_eq!(DEFAULT_MAX_STEP_RETRIES, 5);
    }

    #[test]
    fn thresholds_are_inclusive_for_both_triggers() {
        // Counts: dataset_len == threshold is enough.
        let mut r = run(plan(counts_trigger()));
        r.step(&Event::Started { now: now(0) }).unwrap();
        let a = r
            .step(&Event::CountsRead {
                counts: FeedbackCounts {
                    misclassified: 40,
                    correct: 0,
                },
            })
            .unwrap();
        assert_eq!(a, vec![Action::ReadPublished]);
        assert_eq!(r.seq, 2, "one sequence number per event");
        // One below: skipped.
        let mut r = run(plan(counts_trigger()));
        r.step(&Event::Started { now: now(0) }).unwrap();
        let a = r
            .step(&Event::CountsRead {
                counts: FeedbackCounts {
                    misclassified: 39,
                    correct: 0,
                },
            })
            .unwrap();
        assert_eq!(a, vec![Action::Commit { cursor: None }]);
        // Metadata: exactly `threshold` new samples is enough, one less is not.
        for (samples, proceeds) in [(60, true), (59, false), (61, true)] {
            let mut p = plan(Trigger::Metadata { threshold: 50 });
            p.prepare = None;
            let mut r = LabelRun::new(
                RunId::generate(),
                CycleId::generate(),
                p,
                LabelCursor {
                    watermark: None,
                    consumed_version: Some(VersionTag::new("v0")),
                    consumed_num_samples: Some(10),
                    rejected_version: None,
                },
            );
            r.step(&Event::Started { now: now(0) }).unwrap();
            let a = r
                .step(&Event::PublishedRead {
                    current: Some(dataset("v1", samples)),
                })
                .unwrap();
            assert_eq!(r.measured, Some(samples - 10));
            if proceeds {
                assert!(
                    matches!(a[..], [Action::StartTraining { .. }]),
                    "{samples}: {a:?}"
                );
            } else {
                assert_eq!(a, vec![Action::Commit { cursor: None }], "{samples}");
                assert!(matches!(r.outcome, Some(Outcome::Skipped { .. })));
            }
        }
    }

    #[test]
    fn disabled_promotion_passes_without_touching_the_registry() {
        let mut p = plan(counts_trigger());
        p.promote = PromoteMode::Disabled;
        let mut r = polling(p);
        r.step(&Event::Polled {
            now: now(2),
            dataset: Some(dataset("v2", 60)),
            prepare_stage: None,
        })
        .unwrap();
        started(&mut r);
        finished(&mut r, 0.95);
        let a = r.step(&Event::BaselineRead { production: None }).unwrap();
        assert_eq!(a, vec![Action::Notify]);
        assert_eq!(r.outcome, Some(Outcome::Passed));
    }

    #[test]
    fn failures_while_releasing_notifying_or_finishing_still_end_the_run() {
        let mut p = plan(counts_trigger());
        p.leased = true;
        let mut r = polling(p);
        let a = r
            .step(&Event::Polled {
                now: now(2),
                dataset: Some(dataset("v2", 60)),
                prepare_stage: None,
            })
            .unwrap();
        assert_eq!(a, vec![Action::AcquireLease { attempt: 1 }]);
        let lease = Lease {
            id: "l".into(),
            label: r.label().clone(),
            run_id: r.run_id.clone(),
            provider: "ec2".into(),
            resources: vec!["i-1".into()],
            region: None,
            acquired_at: now(2),
            max_until: now(3),
            attributes: Default::default(),
            released_at: None,
        };
        r.step(&Event::LeaseAcquired {
            lease: lease.clone(),
        })
        .unwrap();
        started(&mut r);
        // Training fails: the lease is released first.
        let a = r
            .step(&Event::ActionFailed {
                reason: "oom".into(),
            })
            .unwrap();
        assert_eq!(
            a,
            vec![Action::ReleaseLease {
                lease: Box::new(lease)
            }]
        );
        // Releasing fails too: recorded, left to `infra reap`, then notify.
        let a = r
            .step(&Event::ActionFailed {
                reason: "ec2 said no".into(),
            })
            .unwrap();
        assert_eq!(a, vec![Action::Notify]);
        assert!(r.lease_released);
        match &r.outcome {
            Some(Outcome::Failed { stage, reason }) => {
                assert_eq!(*stage, Stage::Training);
                assert!(
                    reason.contains("oom")
                        && reason.contains("releasing the lease failed: ec2 said no"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Notifying fails: the error is kept and the run commits.
        let a = r
            .step(&Event::ActionFailed {
                reason: "slack down".into(),
            })
            .unwrap();
        assert_eq!(a, vec![Action::Commit { cursor: None }]);
        assert_eq!(r.notify_error.as_deref(), Some("slack down"));
        r.step(&Event::Committed).unwrap();
        assert!(r.is_done());
    }

    #[test]
    fn polls_are_counted_and_a_lease_renewal_needs_a_lease() {
        let mut r = run(plan(counts_trigger()));
        assert!(r
            .step(&Event::LeaseRenewed {
                lease: Lease {
                    id: "l".into(),
                    label: r.label().clone(),
                    run_id: r.run_id.clone(),
                    provider: "ec2".into(),
                    resources: vec![],
                    region: None,
                    acquired_at: now(0),
                    max_until: now(0),
                    attributes: Default::default(),
                    released_at: None,
                },
            })
            .is_err());
        r.step(&Event::Started { now: now(0) }).unwrap();
        r.step(&Event::CountsRead {
            counts: FeedbackCounts {
                misclassified: 50,
                correct: 0,
            },
        })
        .unwrap();
        r.step(&Event::PublishedRead { current: None }).unwrap();
        r.step(&Event::PrepareRestarted { now: now(1) }).unwrap();
        for i in 1..=3 {
            r.step(&Event::Polled {
                now: now(1 + i),
                dataset: None,
                prepare_stage: None,
            })
            .unwrap();
            assert_eq!(r.polls, i as u32);
        }
    }

    #[test]
    fn a_gate_free_run_reports_its_candidate_only_when_named() {
        for (id, expected) in [("", None), ("cand-7", Some("cand-7".to_string()))] {
            let mut p = plan(counts_trigger());
            p.gate = None;
            let mut r = polling(p);
            r.step(&Event::Polled {
                now: now(2),
                dataset: Some(dataset("v2", 60)),
                prepare_stage: None,
            })
            .unwrap();
            started(&mut r);
            let a = r
                .step(&Event::TrainingFinished {
                    candidate: Candidate {
                        id: id.into(),
                        metrics: Default::default(),
                    },
                })
                .unwrap();
            assert_eq!(a, vec![Action::Notify]);
            assert_eq!(
                r.outcome,
                Some(Outcome::Trained {
                    candidate: expected
                })
            );
        }
    }

    fn rollback_to(version: &str) -> Rollback {
        Rollback {
            to_version: version.into(),
            from_version: Some("3".into()),
            by: "alice".into(),
            reason: "dice regressed".into(),
            forced: false,
            at: now(5),
            restored_run: Some(RunId("promoted-2".into())),
            restored_candidate: Some("cand-2".into()),
        }
    }

    #[test]
    fn a_rollback_run_rolls_back_notifies_and_commits_no_cursor() {
        let mut r = run(plan(counts_trigger()));
        r.cursor.consumed_version = Some(VersionTag::new("v9"));
        let a = r
            .step(&Event::RollbackRequested {
                rollback: rollback_to("2"),
            })
            .unwrap();
        assert_eq!(
            a,
            vec![Action::RollBack {
                version: "2".into()
            }]
        );
        assert_eq!(r.stage, Stage::RollingBack);
        assert_eq!(r.started_at, Some(now(5)));
        assert_eq!(r.promotion_kind(), crate::journal::PromotionKind::Rollback);
        assert_eq!(r.candidate_run(), Some(&RunId("promoted-2".into())));
        // A transient registry failure retries the same rollback.
        let a = r
            .step(&Event::StepDeferred {
                error: "503".into(),
                done: vec![],
            })
            .unwrap();
        assert_eq!(
            a,
            vec![Action::RollBack {
                version: "2".into()
            }]
        );
        let a = r
            .step(&Event::RolledBack {
                version: PromotedVersion {
                    version: "2".into(),
                    previous: None,
                },
            })
            .unwrap();
        assert_eq!(a, vec![Action::Notify]);
        assert_eq!(
            r.outcome,
            Some(Outcome::RolledBack {
                from: Some("3".into()),
                to: "2".into()
            }),
            "the requested `from` stands in for a registry that did not say"
        );
        let a = r.step(&Event::Notified { error: None }).unwrap();
        assert_eq!(a, vec![Action::Commit { cursor: None }]);
        r.step(&Event::Committed).unwrap();
        assert!(r.is_done());
        assert_eq!(r.outcome.as_ref().unwrap().short(), "rolled_back");
    }

    #[test]
    fn a_failed_rollback_is_reported_and_rollback_events_are_refused_elsewhere() {
        let mut r = run(plan(counts_trigger()));
        r.step(&Event::RollbackRequested {
            rollback: rollback_to("2"),
        })
        .unwrap();
        let a = r
            .step(&Event::ActionFailed {
                reason: "no such version".into(),
            })
            .unwrap();
        assert_eq!(a, vec![Action::Notify]);
        assert!(matches!(
            r.outcome,
            Some(Outcome::Failed {
                stage: Stage::RollingBack,
                ..
            })
        ));
        // Not in a cycle's run, not twice, not in a dry run.
        let mut cycle = run(plan(counts_trigger()));
        cycle.step(&Event::Started { now: now(0) }).unwrap();
        let request = Event::RollbackRequested {
            rollback: rollback_to("2"),
        };
        assert!(cycle.step(&request).is_err());
        let rolled = Event::RolledBack {
            version: PromotedVersion {
                version: "2".into(),
                previous: None,
            },
        };
        assert!(cycle.step(&rolled).is_err());
        let mut dry = plan(counts_trigger());
        dry.dry_run = true;
        assert!(run(dry).step(&request).is_err());
        assert_eq!(Stage::RollingBack.as_str(), "rolling_back");
        assert_eq!(request.name(), "rollback_requested");
        assert_eq!(rolled.name(), "rolled_back");
        assert!(Action::RollBack {
            version: "1".into()
        }
        .is_side_effect());
    }

    fn check(passed: bool) -> Event {
        Event::DatasetChecked {
            result: DatasetCheckResult {
                passed,
                summary: Default::default(),
                report_md: Some("## Masks\n3 masks are not binary".into()),
                detail: None,
            },
        }
    }

    #[test]
    fn a_dataset_check_comes_before_the_lease_and_a_rejection_records_only_the_version() {
        let mut p = plan(counts_trigger());
        p.dataset_check = true;
        p.leased = true;
        let mut r = polling(p.clone());
        let a = r
            .step(&Event::Polled {
                now: now(2),
                dataset: Some(dataset("v2", 60)),
                prepare_stage: None,
            })
            .unwrap();
        assert_eq!(
            a,
            vec![Action::CheckDataset {
                version: VersionTag::new("v2"),
                job_key: JobKey::dataset_check(&r.run_id),
            }]
        );
        assert_eq!(r.stage, Stage::Checking);
        // Rejected: no lease, notify, then commit only the rejected version.
        assert_eq!(r.step(&check(false)).unwrap(), vec![Action::Notify]);
        match &r.outcome {
            Some(Outcome::DatasetRejected { version, reason }) => {
                assert_eq!(version.as_str(), "v2");
                assert!(reason.contains("3 masks are not binary"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let a = r.step(&Event::Notified { error: None }).unwrap();
        assert_eq!(
            a,
            vec![Action::Commit {
                cursor: Some(LabelCursor {
                    rejected_version: Some(VersionTag::new("v2")),
                    ..LabelCursor::default()
                })
            }]
        );
        // Passed: the lease, then training.
        let mut r = polling(p);
        r.step(&Event::Polled {
            now: now(2),
            dataset: Some(dataset("v2", 60)),
            prepare_stage: None,
        })
        .unwrap();
        assert_eq!(
            r.step(&check(true)).unwrap(),
            vec![Action::AcquireLease { attempt: 1 }]
        );
        assert!(r.dataset_check.as_ref().unwrap().passed);
        // A check result outside `checking` is refused.
        assert!(r.step(&check(true)).is_err());
    }

    #[test]
    fn a_rejected_version_is_not_accepted_again() {
        let mut p = plan(counts_trigger());
        p.dataset_check = true;
        let mut r = polling(p);
        r.cursor.rejected_version = Some(VersionTag::new("v2"));
        let a = r
            .step(&Event::Polled {
                now: now(2),
                dataset: Some(dataset("v2", 60)),
                prepare_stage: None,
            })
            .unwrap();
        assert!(matches!(a[..], [Action::Poll { .. }]), "{a:?}");
    }

    #[test]
    fn expiry_and_supersede_close_only_a_waiting_run_without_moving_the_cursor() {
        let waiting = || {
            let mut p = plan(counts_trigger());
            p.promote = PromoteMode::Manual;
            let mut r = training_run_with(p);
            started(&mut r);
            finished(&mut r, 0.95);
            r.step(&Event::BaselineRead { production: None }).unwrap();
            r.step(&Event::Notified { error: None }).unwrap();
            let a = r.step(&Event::Committed).unwrap();
            assert!(a.is_empty());
            assert!(r.is_awaiting_approval());
            r
        };
        let expired = Event::ApprovalExpired {
            at: now(100),
            reason: "not approved within approval_expires = 7d".into(),
        };
        let mut r = waiting();
        assert_eq!(r.step(&expired).unwrap(), vec![Action::Notify]);
        assert_eq!(r.outcome.as_ref().unwrap().short(), "expired");
        assert_eq!(
            r.step(&Event::Notified { error: None }).unwrap(),
            vec![Action::Commit { cursor: None }]
        );
        r.step(&Event::Committed).unwrap();
        assert!(r.is_done());
        assert!(r.step(&expired).is_err(), "closed once");

        let mut r = waiting();
        let by_itself = Event::Superseded {
            by_run: r.run_id.clone(),
            at: now(100),
        };
        assert!(r.step(&by_itself).is_err(), "a run never supersedes itself");
        let newer = RunId::generate();
        r.step(&Event::Superseded {
            by_run: newer.clone(),
            at: now(100),
        })
        .unwrap();
        assert_eq!(r.outcome, Some(Outcome::Superseded { by_run: newer }));
        assert!(r
            .step(&Event::Approved {
                by: "alice".into(),
                reason: None,
                at: now(101)
            })
            .is_err());
        // Outside `awaiting_approval` both are refused.
        let mut r = training_run();
        assert!(r.step(&expired).is_err());
    }

    #[test]
    fn a_waiting_run_from_an_older_journal_never_commits_its_cursor_again() {
        let mut p = plan(counts_trigger());
        p.promote = PromoteMode::Manual;
        let mut r = training_run_with(p);
        started(&mut r);
        finished(&mut r, 0.95);
        r.step(&Event::BaselineRead { production: None }).unwrap();
        r.step(&Event::Notified { error: None }).unwrap();
        r.step(&Event::Committed).unwrap();
        // A snapshot journaled before `cursor_committed` existed.
        let mut json = serde_json::to_value(&r).unwrap();
        json.as_object_mut().unwrap().remove("cursor_committed");
        let mut legacy: LabelRun = serde_json::from_value(json).unwrap();
        assert!(!legacy.cursor_committed);
        legacy
            .step(&Event::Rejected {
                by: "bob".into(),
                reason: "no".into(),
                at: now(50),
            })
            .unwrap();
        assert_eq!(
            legacy.step(&Event::Notified { error: None }).unwrap(),
            vec![Action::Commit { cursor: None }]
        );
    }

    fn training_run_with(plan: LabelPlan) -> LabelRun {
        let mut r = polling(plan);
        r.step(&Event::Polled {
            now: now(2),
            dataset: Some(dataset("v2", 60)),
            prepare_stage: None,
        })
        .unwrap();
        r
    }

    #[test]
    fn new_names_match_the_journal_tags() {
        let events = [
            check(true),
            Event::ApprovalExpired {
                at: now(0),
                reason: "r".into(),
            },
            Event::Superseded {
                by_run: RunId("r".into()),
                at: now(0),
            },
        ];
        for event in events {
            let tag = serde_json::to_value(&event).unwrap()["event"].clone();
            assert_eq!(tag, event.name());
        }
        for (outcome, short) in [
            (
                Outcome::DatasetRejected {
                    version: VersionTag::new("v"),
                    reason: "r".into(),
                },
                "dataset_rejected",
            ),
            (Outcome::Expired { reason: "r".into() }, "expired"),
            (
                Outcome::Superseded {
                    by_run: RunId("r".into()),
                },
                "superseded",
            ),
        ] {
            assert_eq!(outcome.short(), short);
            assert_eq!(serde_json::to_value(&outcome).unwrap()["kind"], short);
            assert!(!outcome.is_failure());
        }
        assert_eq!(serde_json::to_value(Stage::Checking).unwrap(), "checking");
        assert!(Action::CheckDataset {
            version: VersionTag::new("v"),
            job_key: JobKey("k".into())
        }
        .is_side_effect());
        // Journals written before these fields existed read as the defaults.
        let mut json = serde_json::to_value(plan(counts_trigger())).unwrap();
        json.as_object_mut().unwrap().remove("approval_expires");
        json.as_object_mut().unwrap().remove("dataset_check");
        let old: LabelPlan = serde_json::from_value(json).unwrap();
        assert_eq!(old.approval_expires, DEFAULT_APPROVAL_EXPIRES);
        assert!(!old.dataset_check);
    }

    #[test]
    fn invalid_events_are_refused() {
        let mut r = run(plan(counts_trigger()));
        let err = r.step(&Event::Committed).unwrap_err();
        assert_eq!(err.stage, Stage::Created);
        assert_eq!(err.event, "committed");
    }
}
