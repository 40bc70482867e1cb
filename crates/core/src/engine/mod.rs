//! The async driver around the state machine.
//!
//! The engine decides nothing itself: it locks, feeds events to
//! [`LabelRun::step`], persists, executes the returned actions through the
//! ports and feeds their outcomes back. Each invariant lives in one file:
//!
//! - `cycle.rs`: the two phases of a cycle and the drive
//!   loop. **Journal before acting:** every transition (snapshot + pending
//!   actions, i.e. the *intents*) is written to the `RunStore` before any of
//!   its actions runs; a resumed run re-executes exactly its pending actions.
//! - `locks.rs`: label locks, fencing and the heartbeat. **Fenced:** every
//!   store write of a run carries the fence of the lock it was taken under;
//!   the heartbeat covers every label the engine holds (queued or running)
//!   from the moment its lock is taken; a label whose lock was lost or not
//!   renewed for `lock_ttl` executes no further action.
//! - `execute.rs`: actions → ports. **Retry semantics:** transient failures
//!   of the steps that talk to a registry, a notifier or a lease provider
//!   leave the run resumable at that step (`Event::StepDeferred`); training
//!   starts carry their journaled job key so a retried start adopts the job.
//! - `poll.rs`: waiting for a new dataset (deadline-bounded, jittered,
//!   woken early by webhooks).
//! - `scout.rs`: labels waiting on one prepare job share one metadata read
//!   per round until the job publishes. **Skipping is not deciding:** a
//!   skipped read reaches the machine as an unchanged one.
//! - `admin.rs`: what runs outside a cycle (`retrain gate`, `infra reap`).
//! - `rollback.rs`: `retrain rollback`, a run of its own that moves
//!   production back. **Exactly once:** validated before anything is
//!   written; intent journaled before the registry call, which is
//!   idempotent per run id; no cursor moves.
//! - `started.rs`: announcing each label's run id after phase one, while
//!   the cycle goes on (the server's `202`).

mod admin;
mod approval;
mod audit;
mod cycle;
mod execute;
mod intents;
mod locks;
mod poll;
mod rollback;
mod scout;
mod started;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, OnceCell};

use crate::domain::{
    DatasetVersion, FeedbackCounts, Label, Lease, LockOwner, ProcessIdentity, RunId, TrainingHandle,
};
use crate::machine::{Action, LabelPlan, LabelRun, RunManifest};
use crate::ports::{
    CountSource, DatasetCheck, LeaseProvider, MetadataStore, ModelRegistry, Notifier, PortError,
    RunStore, SpaceController, StoreError, Trainer, TrainingRequest,
};
use crate::report::LabelReport;

pub use admin::GateOutcome;
pub use approval::{Decision, DecisionOutcome};
use locks::HeldLocks;
pub use rollback::{
    previous_production, production_lineage, RollbackOutcome, RollbackRefused, RollbackRequest,
};
pub use started::{CycleStarted, LabelStart};

/// Source of wall-clock time for events. The default follows tokio's clock
/// so that tests with paused time see time advance consistently.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> DateTime<Utc>;
}

/// Wall-clock time anchored at creation and advanced by `tokio::time`.
#[derive(Debug)]
pub struct TokioClock {
    wall_at_start: DateTime<Utc>,
    instant_at_start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        Self {
            wall_at_start: Utc::now(),
            instant_at_start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = tokio::time::Instant::now() - self.instant_at_start;
        self.wall_at_start + chrono::Duration::from_std(elapsed).unwrap_or_default()
    }
}

/// The ports one label is driven through, built by the wiring layer.
#[derive(Clone)]
pub struct LabelBinding {
    /// The plan new runs start with (`dry_run` is set per cycle).
    pub plan: LabelPlan,
    pub metadata: Arc<dyn MetadataStore>,
    pub prepare: Option<Arc<dyn SpaceController>>,
    pub trainer: Arc<dyn Trainer>,
    pub registry: Option<Arc<dyn ModelRegistry>>,
    pub lease: Option<Arc<dyn LeaseProvider>>,
    pub notifiers: Vec<Arc<dyn Notifier>>,
    pub train_timeout: Duration,
    /// The label's `dataset_check`, run on every accepted dataset version
    /// before the lease and the training (`plan.dataset_check` says it is set).
    pub dataset_check: Option<Arc<dyn DatasetCheck>>,
}

impl std::fmt::Debug for LabelBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabelBinding")
            .field("label", &self.plan.label)
            .field("metadata", &self.metadata.describe())
            .field("trainer", &self.trainer.describe())
            .finish_non_exhaustive()
    }
}

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub max_parallel_labels: usize,
    /// How long a label lock lives without renewal. The heartbeat renews
    /// every `lock_ttl / 3`; a holder that could not renew for `lock_ttl`
    /// stops the label before its next action.
    pub lock_ttl: Duration,
    /// Fraction of the poll interval added as random jitter (0.1 = up to +10 %).
    pub poll_jitter: f64,
    /// While labels wait on one prepare job that has published none of
    /// their datasets yet, one of them reads its metadata per round and
    /// each of the others at least this often (`scout.rs`); zero: every
    /// label reads every round.
    pub poll_scout_max_gap: Duration,
    pub owner: LockOwner,
    /// Recorded in every run's manifest.
    pub manifest: RunManifest,
}

/// Default [`EngineSettings::lock_ttl`]: short enough that a dead holder on
/// another host frees its labels within a minute (etcd/Consul-style leases),
/// renewed every 20 s.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(60);

/// Default [`EngineSettings::poll_scout_max_gap`]: five rounds at the
/// default poll interval (60 s), so a job that publishes one label at a
/// time is noticed at most five minutes late, while a job that publishes
/// them together costs one read per round instead of one per label.
pub const DEFAULT_POLL_SCOUT_MAX_GAP: Duration = Duration::from_secs(300);

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_parallel_labels: 16,
            lock_ttl: DEFAULT_LOCK_TTL,
            poll_jitter: 0.1,
            poll_scout_max_gap: DEFAULT_POLL_SCOUT_MAX_GAP,
            owner: LockOwner::generate("retrain"),
            manifest: RunManifest::default(),
        }
    }
}

impl EngineSettings {
    /// Settings whose lock owner names this process (see
    /// [`LockOwner::for_process`]).
    pub fn for_process(process: &ProcessIdentity) -> Self {
        Self {
            owner: LockOwner::for_process("retrain", process),
            ..Self::default()
        }
    }
}

/// Errors that stop a whole cycle before any label runs.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown label `{0}` (configured: {1})")]
    UnknownLabel(String, String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Port(#[from] PortError),
    #[error("label `{0}` has no model registry configured")]
    NoRegistry(Label),
    #[error("label `{0}` has no gate policy (gate = \"none\")")]
    NoGate(Label),
    #[error("label `{0}` is being driven by {1}; try again when its run has finished")]
    Busy(Label, String),
    #[error("no run with id {0}")]
    NoSuchRun(RunId),
    #[error("run {0} is not awaiting approval (it is {1})")]
    NotAwaitingApproval(RunId, String),
    /// The run waited for a decision but was closed by expiry or by a newer
    /// candidate: it can never be approved (or rejected) any more.
    #[error("run {run} can no longer be approved or rejected: {why}")]
    ApprovalClosed { run: RunId, why: String },
    #[error("production changed since the verdict of run {run}: the candidate was gated against version {recorded}, production is now {current}; approve with --regate to gate it against the current production first")]
    ProductionChanged {
        run: RunId,
        recorded: String,
        current: String,
    },
    #[error(transparent)]
    RollbackRefused(#[from] RollbackRefused),
}

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct CycleRequest {
    /// `None` = every configured label.
    pub labels: Option<Vec<Label>>,
    pub dry_run: bool,
}

/// Drives label runs through the ports.
///
/// # Wiring
///
/// An engine is a [`RunStore`] (journal, cursors, locks), an optional
/// [`CountSource`], one [`LabelBinding`] per label (its [`LabelPlan`] and
/// the ports it is driven through) and [`EngineSettings`]. `retrain-adapters`
/// implements every port (`wiring::build_engine` builds them from a config
/// file); an embedding service may implement any of them itself, see
/// `examples/embed` and `docs/embedding.md`. The minimal wiring, with the
/// `mocks` feature's in-memory doubles and a count source of our own, and a
/// dry run (reads only: no lock, nothing journaled, no job started):
///
/// ```
/// use std::collections::BTreeMap;
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// use retrain_core::domain::{CorrectRatio, FeedbackCounts, Label, LabelCursor};
/// use retrain_core::engine::{CycleRequest, Engine, EngineSettings, LabelBinding};
/// use retrain_core::machine::{LabelPlan, PromoteMode, Trigger};
/// use retrain_core::mocks::{MockMetadataStore, MockRunStore, MockTrainer};
/// use retrain_core::ports::{CountSource, MetadataRead, PortError};
/// use retrain_core::report::LabelStatus;
/// use retrain_core::CancellationToken;
///
/// /// The embedding service's own feedback counter.
/// struct Fixed(u64);
///
/// #[async_trait::async_trait]
/// impl CountSource for Fixed {
///     async fn counts(
///         &self,
///         _since: chrono::DateTime<chrono::Utc>,
///     ) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
///         let counts = FeedbackCounts { misclassified: self.0, correct: 0 };
///         Ok(BTreeMap::from([(Label::new("department").unwrap(), counts)]))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let label = Label::new("department").unwrap();
/// let mut store = MockRunStore::new();
/// store.expect_cursor().returning(|_| Ok(LabelCursor::default()));
/// // The cycle reads every counts-triggered label's watermark at once.
/// store
///     .expect_cursors()
///     .returning(|labels| Ok(vec![LabelCursor::default(); labels.len()]));
/// let mut metadata = MockMetadataStore::new();
/// metadata.expect_read().returning(|_| Ok(MetadataRead::Absent));
/// metadata.expect_describe().return_const("dataset_metadata.json");
/// let mut trainer = MockTrainer::new();
/// trainer.expect_start().never();
/// trainer.expect_describe().return_const("trainer");
///
/// let binding = LabelBinding {
///     plan: LabelPlan {
///         label: label.clone(),
///         trigger: Trigger::Counts {
///             threshold: 40,
///             correct_ratio: CorrectRatio::new(1.0).unwrap(),
///         },
///         prepare: None,
///         gate: None,
///         leased: false,
///         promote: PromoteMode::Auto,
///         max_attempts: 2,
///         max_step_retries: 5,
///         poll_interval: Duration::from_secs(60),
///         poll_timeout: Duration::from_secs(1800),
///         dry_run: false,
///         approval_expires: retrain_core::machine::DEFAULT_APPROVAL_EXPIRES,
///         dataset_check: false,
///     },
///     metadata: Arc::new(metadata),
///     prepare: None,
///     trainer: Arc::new(trainer),
///     registry: None,
///     lease: None,
///     notifiers: Vec::new(),
///     train_timeout: Duration::from_secs(3600),
///     dataset_check: None,
/// };
/// let engine = Engine::new(
///     Arc::new(store),
///     Some(Arc::new(Fixed(50))),
///     vec![binding],
///     EngineSettings::default(),
/// );
/// let request = CycleRequest { labels: None, dry_run: true };
/// let report = engine.run_cycle(request, CancellationToken::new()).await.unwrap();
/// assert_eq!(report.labels[0].status, LabelStatus::Planned);
/// assert_eq!(report.labels[0].measured, Some(50));
/// # }
/// ```
pub struct Engine {
    store: Arc<dyn RunStore>,
    counts: Option<Arc<dyn CountSource>>,
    labels: BTreeMap<Label, LabelBinding>,
    settings: EngineSettings,
    clock: Arc<dyn Clock>,
    wakers: Mutex<HashMap<Label, Arc<Notify>>>,
    locks: HeldLocks,
    /// Time of each run's previous transition, for the audit log's `duration_s`.
    audit_marks: audit::Marks,
    /// Metrics history read for a notification, reused by the cycle report.
    history: audit::KeptHistory,
    /// Metadata reads skipped because another label of the same prepare
    /// job scouted that round (`scout.rs`).
    skipped_reads: std::sync::atomic::AtomicU64,
    /// Training intents this process journaled and has not started yet,
    /// with the fence they were journaled under (`intents.rs`).
    new_intents: intents::NewIntents,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("labels", &self.labels.keys().collect::<Vec<_>>())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The result of one count query, shared by every label with that watermark.
type CountsCell = Arc<OnceCell<Result<BTreeMap<Label, FeedbackCounts>, PortError>>>;
/// The result of one prepare restart, shared by every label using that job.
type PrepareCell = Arc<OnceCell<Result<(), PortError>>>;

/// One read of a prepare job's stage, shared by the labels polling within
/// the same round (`None`: the read failed).
type StageCell = Arc<OnceCell<Option<crate::domain::SpaceStage>>>;

/// Per-cycle shared work: one count query per watermark, one restart per
/// prepare job, one stage read per prepare job per poll round.
#[derive(Default)]
struct CycleShared {
    /// The watermark of every counts-triggered label of the cycle, read
    /// before it starts: their counts are one `counts_per_label` call.
    watermarks: BTreeMap<Label, DateTime<Utc>>,
    per_label_counts: CountsCell,
    /// Reads at a watermark other than the one read before the cycle.
    counts: Mutex<HashMap<DateTime<Utc>, CountsCell>>,
    prepares: Mutex<HashMap<String, PrepareCell>>,
    /// Recorded in the manifest of every run the cycle creates.
    triggered_by: Option<String>,
    stages: Mutex<HashMap<String, (tokio::time::Instant, StageCell)>>,
    /// The labels waiting on each prepare job (`scout.rs`).
    watches: Mutex<HashMap<String, Arc<scout::JobWatch>>>,
}

impl CycleShared {
    fn counts_cell(&self, since: DateTime<Utc>) -> CountsCell {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(since).or_default().clone()
    }
    fn prepare_cell(&self, key: &str) -> PrepareCell {
        let mut map = self.prepares.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.to_owned()).or_default().clone()
    }
    fn job_watch(&self, key: &str) -> Arc<scout::JobWatch> {
        let mut map = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.to_owned()).or_default().clone()
    }
    /// What the latest stage read of prepare job `key` found, without
    /// reading it (`None`: no read finished yet, or it failed).
    fn last_stage(&self, key: &str) -> Option<crate::domain::SpaceStage> {
        let map = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key)
            .and_then(|(_, cell)| cell.get().cloned().flatten())
    }
    /// The stage read of prepare job `key` begun less than `fresh` ago (in
    /// flight or done), or a new one: labels waiting on the same job share
    /// one read per round instead of one each.
    fn stage_cell(&self, key: &str, fresh: Duration) -> StageCell {
        let now = tokio::time::Instant::now();
        let mut map = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(key) {
            Some((begun, cell)) if now.duration_since(*begun) < fresh => cell.clone(),
            _ => {
                let cell = StageCell::default();
                map.insert(key.to_owned(), (now, cell.clone()));
                cell
            }
        }
    }
}

/// Result of executing one action.
enum Executed {
    Event(crate::machine::Event),
    /// The commit wrote the final state itself.
    Committed,
    CommitFailed(String),
    Interrupted,
    /// The label's lock is gone: stop without any further action.
    LockLost(String),
}

/// Why driving stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DriveEnd {
    Finished,
    /// The next action is for the next phase.
    Halted,
    /// Stopped by an interrupt; with a note when the lease could not be stopped.
    Interrupted(Option<String>),
    JournalFailed(String),
    /// A step failed transiently; the run resumes there next cycle.
    Deferred(String),
    /// The lock was lost (expired, taken over): nothing more was done.
    LockLost(String),
}

/// A label that passed phase one.
struct LabelTask {
    run: LabelRun,
    actions: Vec<Action>,
    ended: DriveEnd,
    resumed: bool,
    /// `None` for a dry run (no lock taken, nothing journaled).
    fence: Option<crate::domain::Fence>,
    /// Cancelled when the label's lock is lost.
    lost: tokio_util::sync::CancellationToken,
    /// Runs awaiting approval closed in phase one (see
    /// `LabelReport::closed_runs`).
    closed: Vec<crate::domain::RunId>,
}

enum Begun {
    Task(Box<LabelTask>),
    Done(Box<LabelReport>),
}

impl Begun {
    fn done(report: LabelReport) -> Self {
        Self::Done(Box::new(report))
    }
}

impl Engine {
    pub fn new(
        store: Arc<dyn RunStore>,
        counts: Option<Arc<dyn CountSource>>,
        labels: Vec<LabelBinding>,
        settings: EngineSettings,
    ) -> Self {
        Self {
            store,
            counts,
            labels: labels
                .into_iter()
                .map(|b| (b.plan.label.clone(), b))
                .collect(),
            settings,
            clock: Arc::new(TokioClock::new()),
            wakers: Mutex::new(HashMap::new()),
            locks: HeldLocks::default(),
            audit_marks: audit::Marks::default(),
            history: audit::KeptHistory::default(),
            skipped_reads: std::sync::atomic::AtomicU64::new(0),
            new_intents: intents::NewIntents::default(),
        }
    }

    /// How many dataset metadata reads this engine's waiting labels
    /// skipped because another label of their prepare job read for them
    /// (`poll_scout_max_gap`); only grows.
    pub fn metadata_reads_skipped(&self) -> u64 {
        self.skipped_reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn labels(&self) -> impl Iterator<Item = &LabelBinding> {
        self.labels.values()
    }

    pub fn store(&self) -> &Arc<dyn RunStore> {
        &self.store
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Wake the dataset poll of `label` early (a webhook saw a new commit).
    pub fn wake(&self, label: &Label) {
        let waker = self.waker(label);
        waker.notify_one();
    }

    fn waker(&self, label: &Label) -> Arc<Notify> {
        let mut map = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(label.clone()).or_default().clone()
    }

    fn select_labels(&self, request: &CycleRequest) -> Result<Vec<Label>, EngineError> {
        match &request.labels {
            None => Ok(self.labels.keys().cloned().collect()),
            Some(wanted) if wanted.is_empty() => Ok(self.labels.keys().cloned().collect()),
            Some(wanted) => {
                let mut selected = Vec::new();
                for label in wanted {
                    if !self.labels.contains_key(label) {
                        return Err(self.unknown(label));
                    }
                    if !selected.contains(label) {
                        selected.push(label.clone());
                    }
                }
                Ok(selected)
            }
        }
    }

    fn unknown(&self, label: &Label) -> EngineError {
        let known: Vec<&str> = self.labels.keys().map(Label::as_str).collect();
        EngineError::UnknownLabel(label.to_string(), known.join(", "))
    }
}

fn active_lease(run: &LabelRun) -> Option<Lease> {
    run.lease
        .as_deref()
        .filter(|_| !run.lease_released)
        .cloned()
}

fn training_request(run: &LabelRun, attempt: u32, dataset: &DatasetVersion) -> TrainingRequest {
    TrainingRequest {
        label: run.label().clone(),
        run_id: run.run_id.clone(),
        attempt,
        job_key: run.job_key(),
        dataset_name: dataset.metadata.dataset_name.clone(),
        dataset_version: dataset.metadata.version_tag.clone(),
        lease: active_lease(run),
        first_start: false,
    }
}

/// The handle of the training job in flight, if the run has one.
fn running_job(run: &LabelRun) -> Option<&TrainingHandle> {
    run.handle
        .as_ref()
        .filter(|_| run.stage == crate::machine::Stage::Training)
}
