//! The async driver around the state machine.
//!
//! Invariant: for every transition, the new state (with its pending actions)
//! is written to the `RunStore` *before* any of those actions runs. The engine
//! decides nothing itself: it locks, feeds events to [`LabelRun::step`],
//! persists, executes the returned actions through the ports and feeds their
//! outcomes back.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use tokio::sync::{Notify, OnceCell};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::domain::{
    Candidate, CycleId, DatasetVersion, FeedbackCounts, Fence, JobKey, Label, Lease, LockOutcome,
    LockOwner, RunId, TrainingOutcome,
};
use crate::gate::Verdict;
use crate::journal::Transition;
use crate::machine::{Action, Event, LabelPlan, LabelRun, RunManifest, Stage};
use crate::ports::{
    CountSource, LeaseProvider, MetadataRead, MetadataStore, ModelRegistry, Notifier, PortError,
    RunStore, SpaceController, StoreError, Trainer, TrainingRequest,
};
use crate::report::{CycleReport, LabelReport, LabelStatus};

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
    pub lock_ttl: Duration,
    /// Fraction of the poll interval added as random jitter (0.1 = up to +10 %).
    pub poll_jitter: f64,
    pub owner: LockOwner,
    /// Recorded in every run's manifest.
    pub manifest: RunManifest,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_parallel_labels: 16,
            lock_ttl: Duration::from_secs(600),
            poll_jitter: 0.1,
            owner: LockOwner::generate("retrain"),
            manifest: RunManifest::default(),
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
}

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct CycleRequest {
    /// `None` = every configured label.
    pub labels: Option<Vec<Label>>,
    pub dry_run: bool,
}

/// Drives label runs through the ports.
pub struct Engine {
    store: Arc<dyn RunStore>,
    counts: Option<Arc<dyn CountSource>>,
    labels: BTreeMap<Label, LabelBinding>,
    settings: EngineSettings,
    clock: Arc<dyn Clock>,
    wakers: Mutex<HashMap<Label, Arc<Notify>>>,
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

/// Per-cycle shared work: one count query per watermark, one restart per prepare job.
#[derive(Default)]
struct CycleShared {
    counts: Mutex<HashMap<DateTime<Utc>, CountsCell>>,
    prepares: Mutex<HashMap<String, PrepareCell>>,
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
}

/// Result of executing one action.
enum Executed {
    Event(Event),
    /// The commit wrote the final state itself.
    Committed,
    CommitFailed(String),
    Interrupted,
}

/// Why driving stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DriveEnd {
    Finished,
    /// The next action is for the next phase.
    Halted,
    Interrupted,
    JournalFailed(String),
}

/// A label that passed phase one.
struct LabelTask {
    run: LabelRun,
    actions: Vec<Action>,
    ended: DriveEnd,
    resumed: bool,
    fence: Option<Fence>,
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
        }
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
                        let known: Vec<&str> = self.labels.keys().map(Label::as_str).collect();
                        return Err(EngineError::UnknownLabel(
                            label.to_string(),
                            known.join(", "),
                        ));
                    }
                    if !selected.contains(label) {
                        selected.push(label.clone());
                    }
                }
                Ok(selected)
            }
        }
    }

    /// Run one cycle (§3) for the requested labels. One label's failure never
    /// stops another; `cancel` interrupts waits and leaves runs resumable.
    ///
    /// Two phases: first every label is locked and counted and records the
    /// version currently published (reads only); then all labels are driven
    /// to the end. So a prepare job shared by several labels is restarted
    /// once, after *every* label has recorded the version it must replace.
    pub async fn run_cycle(
        &self,
        request: CycleRequest,
        cancel: CancellationToken,
    ) -> Result<CycleReport, EngineError> {
        let labels = self.select_labels(&request)?;
        let cycle_id = CycleId::generate();
        let started_at = self.clock.now();
        let shared = CycleShared::default();
        let span = info_span!("run", run_id = %cycle_id, dry_run = request.dry_run);
        let parallel = self.settings.max_parallel_labels.max(1);
        let reports: Vec<LabelReport> = async {
            let begun: Vec<Begun> = stream::iter(labels.iter().map(|label| {
                self.begin_label(label, &cycle_id, request.dry_run, &shared, &cancel)
                    .instrument(info_span!("label", label = %label))
            }))
            .buffered(parallel)
            .collect()
            .await;
            stream::iter(begun.into_iter().map(|begun| async {
                match begun {
                    Begun::Done(report) => *report,
                    Begun::Task(task) => {
                        let span = info_span!("label", label = %task.run.label());
                        self.finish_label(*task, &shared, &cancel)
                            .instrument(span)
                            .await
                    }
                }
            }))
            .buffered(parallel)
            .collect()
            .await
        }
        .instrument(span)
        .await;
        Ok(CycleReport {
            cycle_id,
            dry_run: request.dry_run,
            started_at,
            finished_at: self.clock.now(),
            interrupted: cancel.is_cancelled(),
            labels: reports,
        })
    }

    /// Phase one: lock, load or create the run, and drive it through the
    /// read-only steps (counts, currently published version).
    async fn begin_label(
        &self,
        label: &Label,
        cycle_id: &CycleId,
        dry_run: bool,
        shared: &CycleShared,
        cancel: &CancellationToken,
    ) -> Begun {
        let binding = &self.labels[label];
        let threshold = binding.plan.trigger.threshold();
        if cancel.is_cancelled() {
            return Begun::done(LabelReport::interrupted_before_run(
                label.clone(),
                threshold,
            ));
        }
        let owner = &self.settings.owner;
        let mut fence = None;
        if !dry_run {
            match self
                .store
                .try_lock(label, owner, self.settings.lock_ttl)
                .await
            {
                Ok(LockOutcome::Acquired(held)) => fence = Some(held),
                Ok(LockOutcome::Busy { owner, expires_at }) => {
                    info!(%owner, %expires_at, "label is busy: another orchestrator holds its lock");
                    return Begun::done(LabelReport::busy(label.clone(), threshold, owner));
                }
                Err(e) => {
                    return Begun::done(LabelReport::failed_before_run(
                        label.clone(),
                        threshold,
                        e.to_string(),
                    ))
                }
            }
        }
        let fail = |error: String| {
            Begun::done(LabelReport::failed_before_run(
                label.clone(),
                threshold,
                error,
            ))
        };
        let unfinished = if dry_run {
            // Dry-run: reads only, no lock, nothing journaled, always fresh.
            Ok(None)
        } else {
            self.store.unfinished_run(label).await
        };
        let (mut run, resumed) = match unfinished {
            Ok(Some(run)) => {
                info!(run_id = %run.run_id, stage = %run.stage, "resuming unfinished run");
                (run, true)
            }
            Ok(None) => match self.store.cursor(label).await {
                Ok(cursor) => {
                    let mut plan = binding.plan.clone();
                    plan.dry_run = dry_run;
                    let mut run = LabelRun::new(RunId::generate(), cycle_id.clone(), plan, cursor);
                    run.manifest = self.settings.manifest.clone();
                    (run, false)
                }
                Err(e) => {
                    self.unlock(label, fence.as_ref()).await;
                    return fail(e.to_string());
                }
            },
            Err(e) => {
                self.unlock(label, fence.as_ref()).await;
                return fail(e.to_string());
            }
        };
        let actions = if resumed {
            run.pending.clone()
        } else {
            let event = Event::Started {
                now: self.clock.now(),
            };
            match self.apply(&mut run, event, fence.as_ref()).await {
                Ok(actions) => actions,
                Err(error) => {
                    self.unlock(label, fence.as_ref()).await;
                    return fail(format!("could not journal the start of the run: {error}"));
                }
            }
        };
        let read_only = |a: &Action| matches!(a, Action::ReadCounts { .. } | Action::ReadPublished);
        let (run, actions, ended) = self
            .drive(
                binding,
                run,
                actions,
                fence.as_ref(),
                shared,
                cancel,
                &read_only,
            )
            .await;
        Begun::Task(Box::new(LabelTask {
            run,
            actions,
            ended,
            resumed,
            fence,
        }))
    }

    /// Phase two: drive the run to its end while renewing the lock.
    async fn finish_label(
        &self,
        task: LabelTask,
        shared: &CycleShared,
        cancel: &CancellationToken,
    ) -> LabelReport {
        let label = task.run.label().clone();
        let binding = &self.labels[&label];
        let LabelTask {
            run,
            actions,
            ended,
            resumed,
            fence,
        } = task;
        let (run, ended) = if ended == DriveEnd::Halted {
            let label_cancel = cancel.child_token();
            let heartbeat = async {
                if let Some(fence) = &fence {
                    self.heartbeat(&label, fence, label_cancel.clone()).await
                } else {
                    std::future::pending().await
                }
            };
            let everything = |_: &Action| true;
            // The lease renewal of a resumed run may take minutes (instances
            // starting): it runs under the heartbeat like the rest.
            let work = async {
                let (run, actions) = if let (true, Some(fence)) = (resumed, &fence) {
                    self.renew_lease_on_resume(binding, run, actions, fence)
                        .await
                } else {
                    (run, actions)
                };
                self.drive(
                    binding,
                    run,
                    actions,
                    fence.as_ref(),
                    shared,
                    &label_cancel,
                    &everything,
                )
                .await
            };
            let result = tokio::select! {
                (run, _, ended) = work => Ok((run, ended)),
                () = heartbeat => Err("lost the label lock (expired and taken by another orchestrator)".to_string()),
            };
            label_cancel.cancel();
            match result {
                Ok(done) => done,
                Err(error) => {
                    self.unlock(&label, fence.as_ref()).await;
                    return LabelReport::failed_before_run(
                        label,
                        binding.plan.trigger.threshold(),
                        error,
                    );
                }
            }
        } else {
            (run, ended)
        };
        self.unlock(&label, fence.as_ref()).await;
        let mut report = LabelReport::from_run(&run, resumed);
        match ended {
            DriveEnd::Finished => {}
            DriveEnd::Interrupted => report.status = LabelStatus::Interrupted,
            DriveEnd::JournalFailed(error) => {
                report.status = LabelStatus::Failed;
                report.error = Some(format!(
                    "run store failure, the run stays resumable: {error}"
                ));
            }
            DriveEnd::Halted => {}
        }
        report
    }

    /// A resumed run that holds a lease and still needs its machines (to
    /// train, or because the registry lives on the leased host) starts them
    /// again first: an interrupt or `infra reap` may have stopped them.
    /// Starting running instances is a no-op, so this is safe either way.
    async fn renew_lease_on_resume(
        &self,
        binding: &LabelBinding,
        mut run: LabelRun,
        actions: Vec<Action>,
        fence: &Fence,
    ) -> (LabelRun, Vec<Action>) {
        let needs_machines = matches!(
            actions.first(),
            Some(
                Action::StartTraining { .. }
                    | Action::AwaitTraining { .. }
                    | Action::ReadBaseline
                    | Action::Promote { .. }
            )
        );
        let (Some(lease), Some(provider)) = (run.lease.clone(), binding.lease.clone()) else {
            return (run, actions);
        };
        if !needs_machines || run.lease_released {
            return (run, actions);
        }
        // Still active in the store (the orchestrator died with it running):
        // nothing stopped the machines, nothing to renew.
        match self.store.active_leases().await {
            Ok(active) if active.iter().any(|l| l.id == lease.id) => return (run, actions),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not read active leases; renewing to be safe"),
        }
        let mut renewing = lease.clone();
        renewing.released_at = None;
        if let Err(e) = self.store.put_lease(&renewing, fence).await {
            warn!(error = %e, "could not record the lease before renewing it");
        }
        let event = match provider.acquire(renewing).await {
            Ok(lease) => {
                if let Err(e) = self.store.put_lease(&lease, fence).await {
                    warn!(error = %e, "could not record lease attributes");
                }
                info!(lease = %lease.id, "lease renewed for the resumed run");
                Event::LeaseRenewed { lease }
            }
            Err(e) => Event::ActionFailed {
                reason: format!("re-acquiring the lease of the resumed run failed: {e}"),
            },
        };
        match self.apply(&mut run, event, Some(fence)).await {
            Ok(next) => (run, next),
            Err(error) => {
                warn!(%error, "could not journal the renewed lease");
                (run, Vec::new())
            }
        }
    }

    async fn unlock(&self, label: &Label, fence: Option<&Fence>) {
        let Some(fence) = fence else {
            return;
        };
        if let Err(e) = self.store.release_lock(label, fence).await {
            warn!(error = %e, "could not release the label lock; it will expire");
        }
    }

    /// Renew the lock until `stop`; completes only if the lock was lost.
    async fn heartbeat(&self, label: &Label, fence: &Fence, stop: CancellationToken) {
        let every = (self.settings.lock_ttl / 3).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                () = stop.cancelled() => { std::future::pending::<()>().await; }
                () = tokio::time::sleep(every) => {}
            }
            match self
                .store
                .renew_lock(label, fence, self.settings.lock_ttl)
                .await
            {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => warn!(error = %e, "lock renewal failed; will retry"),
            }
        }
    }

    /// Execute `actions` and the ones that follow until the run is done,
    /// interrupted, the journal fails, or the next action does not satisfy
    /// `allowed` (then it is returned, not executed).
    #[allow(clippy::too_many_arguments)]
    async fn drive(
        &self,
        binding: &LabelBinding,
        mut run: LabelRun,
        mut actions: Vec<Action>,
        fence: Option<&Fence>,
        shared: &CycleShared,
        cancel: &CancellationToken,
        allowed: &(dyn Fn(&Action) -> bool + Sync),
    ) -> (LabelRun, Vec<Action>, DriveEnd) {
        while let Some(action) = actions.first().cloned() {
            if !allowed(&action) {
                return (run, actions, DriveEnd::Halted);
            }
            let stage = run.stage;
            // Interrupted: stop at this boundary, except for the steps that
            // finish what is under way (persisting the end, stopping machines).
            let must_finish = matches!(action, Action::Commit { .. } | Action::ReleaseLease { .. });
            if cancel.is_cancelled() && !must_finish {
                self.on_interrupt(binding, &run, fence).await;
                return (run, Vec::new(), DriveEnd::Interrupted);
            }
            // Reads may be abandoned mid-flight; side effects run to their
            // outcome so that it can be journaled (a dropped `StartTraining`
            // could leave a job nobody knows about).
            let abandonable = matches!(
                action,
                Action::ReadCounts { .. } | Action::ReadPublished | Action::ReadBaseline
            );
            let execution = self
                .execute(binding, &run, action, shared, cancel, fence)
                .instrument(info_span!("stage", stage = %stage));
            let executed = if abandonable {
                tokio::select! {
                    executed = execution => executed,
                    () = cancel.cancelled() => Executed::Interrupted,
                }
            } else {
                execution.await
            };
            let event = match executed {
                Executed::Event(event) => event,
                Executed::Committed => {
                    let _ = run.step(&Event::Committed);
                    return (run, Vec::new(), DriveEnd::Finished);
                }
                Executed::CommitFailed(error) => {
                    return (run, Vec::new(), DriveEnd::JournalFailed(error));
                }
                Executed::Interrupted => {
                    self.on_interrupt(binding, &run, fence).await;
                    return (run, Vec::new(), DriveEnd::Interrupted);
                }
            };
            match self.apply(&mut run, event, fence).await {
                Ok(next) => actions = next,
                Err(error) => {
                    warn!(%error, "stopping label: the journal could not be written");
                    return (run, Vec::new(), DriveEnd::JournalFailed(error.to_string()));
                }
            }
        }
        (run, Vec::new(), DriveEnd::Finished)
    }

    /// Step the machine and journal the transition before anything acts on it.
    async fn apply(
        &self,
        run: &mut LabelRun,
        event: Event,
        fence: Option<&Fence>,
    ) -> Result<Vec<Action>, StoreError> {
        let from = run.stage;
        let actions = match run.step(&event) {
            Ok(actions) => actions,
            Err(invalid) => {
                warn!(%invalid, "state machine refused an event; failing the label");
                run.step(&Event::ActionFailed {
                    reason: format!("internal error: {invalid}"),
                })
                .unwrap_or_default()
            }
        };
        if let Some(fence) = fence {
            let transition = self.transition(run, from, event);
            self.store.record(&transition, fence).await?;
        }
        Ok(actions)
    }

    fn transition(&self, run: &LabelRun, from: Stage, event: Event) -> Transition {
        Transition {
            run_id: run.run_id.clone(),
            cycle_id: run.cycle_id.clone(),
            label: run.label().clone(),
            seq: run.seq,
            at: self.clock.now(),
            from,
            to: run.stage,
            event,
            actions: run.pending.clone(),
            snapshot: run.clone(),
        }
    }

    /// Ctrl-C / SIGTERM: stop the trainer and the lease; the journal keeps the
    /// run resumable at its recorded stage.
    async fn on_interrupt(&self, binding: &LabelBinding, run: &LabelRun, fence: Option<&Fence>) {
        if let Some(handle) = &run.handle {
            if let Err(e) = binding.trainer.cancel(handle).await {
                warn!(error = %e, "could not stop the training job on interrupt");
            }
        }
        if let (Some(lease), Some(provider)) = (&run.lease, &binding.lease) {
            if !run.lease_released {
                self.release_lease(provider.as_ref(), lease, fence)
                    .await
                    .ok();
            }
        }
    }

    /// Write a lease record: fenced inside a run, unfenced for `infra reap`.
    async fn record_lease(&self, lease: &Lease, fence: Option<&Fence>) -> Result<(), StoreError> {
        match fence {
            Some(fence) => self.store.put_lease(lease, fence).await,
            None => self.store.put_lease_unfenced(lease).await,
        }
    }

    async fn release_lease(
        &self,
        provider: &dyn LeaseProvider,
        lease: &Lease,
        fence: Option<&Fence>,
    ) -> Result<(), String> {
        provider.release(lease).await.map_err(|e| e.to_string())?;
        let mut released = lease.clone();
        released.released_at = Some(self.clock.now());
        self.record_lease(&released, fence)
            .await
            .map_err(|e| e.to_string())?;
        info!(lease = %lease.id, resources = ?lease.resources, "lease released");
        Ok(())
    }

    fn failed(reason: impl std::fmt::Display) -> Executed {
        Executed::Event(Event::ActionFailed {
            reason: reason.to_string(),
        })
    }

    async fn execute(
        &self,
        binding: &LabelBinding,
        run: &LabelRun,
        action: Action,
        shared: &CycleShared,
        cancel: &CancellationToken,
        fence: Option<&Fence>,
    ) -> Executed {
        debug_assert!(
            !(run.plan.dry_run
                && action.is_side_effect()
                && !matches!(action, Action::Commit { .. }))
        );
        match action {
            Action::ReadCounts { since } => {
                let Some(source) = &self.counts else {
                    return Self::failed(
                        "no [counts] source is configured for a counts-triggered label",
                    );
                };
                let cell = shared.counts_cell(since);
                let result = cell
                    .get_or_init(|| async {
                        info!(%since, "reading feedback counts");
                        source.counts(since).await
                    })
                    .await;
                match result {
                    Ok(all) => {
                        let counts = all.get(run.label()).copied().unwrap_or_default();
                        info!(
                            misclassified = counts.misclassified,
                            correct = counts.correct,
                            "counts read"
                        );
                        Executed::Event(Event::CountsRead { counts })
                    }
                    Err(e) => Self::failed(format!("count query failed: {e}")),
                }
            }
            Action::ReadPublished => match binding.metadata.read(None).await {
                Ok(MetadataRead::Published(dataset)) => Executed::Event(Event::PublishedRead {
                    current: Some(dataset),
                }),
                Ok(MetadataRead::Absent | MetadataRead::Unchanged) => {
                    Executed::Event(Event::PublishedRead { current: None })
                }
                Err(e) => Self::failed(format!(
                    "reading dataset metadata {} failed: {e}",
                    binding.metadata.describe()
                )),
            },
            Action::RestartPrepare { key } => {
                let Some(controller) = &binding.prepare else {
                    return Self::failed(format!("prepare job `{key}` is not configured"));
                };
                let cell = shared.prepare_cell(&key);
                let result = cell
                    .get_or_init(|| async {
                        info!(job = %controller.describe(), "restarting prepare job");
                        controller
                            .restart(&JobKey::prepare(&run.cycle_id, &key))
                            .await
                    })
                    .await;
                match result {
                    Ok(()) => Executed::Event(Event::PrepareRestarted {
                        now: self.clock.now(),
                    }),
                    Err(e) => Self::failed(format!(
                        "restarting prepare job {} failed: {e}",
                        controller.describe()
                    )),
                }
            }
            Action::Poll {
                delay_ms,
                check_prepare,
            } => {
                self.poll(binding, run, delay_ms, check_prepare, cancel)
                    .await
            }
            Action::AcquireLease { .. } => {
                let Some(provider) = &binding.lease else {
                    return Self::failed("label is leased but no lease provider is configured");
                };
                let plan = provider.plan();
                let now = self.clock.now();
                let lease = Lease {
                    // One lease record per run: re-acquiring after a lost
                    // attempt updates it instead of leaving an orphan.
                    id: run.run_id.to_string(),
                    label: run.label().clone(),
                    run_id: run.run_id.clone(),
                    provider: plan.provider,
                    resources: plan.resources,
                    region: plan.region,
                    acquired_at: now,
                    max_until: now + chrono::Duration::from_std(plan.max).unwrap_or_default(),
                    attributes: BTreeMap::new(),
                    released_at: None,
                };
                // Recorded before the instances start, so nothing can leak.
                if let Err(e) = self.record_lease(&lease, fence).await {
                    return Self::failed(format!("could not record the lease: {e}"));
                }
                let acquired = tokio::select! {
                    r = provider.acquire(lease.clone()) => r,
                    () = cancel.cancelled() => {
                        self.release_lease(provider.as_ref(), &lease, fence).await.ok();
                        return Executed::Interrupted;
                    }
                };
                match acquired {
                    Ok(lease) => {
                        if let Err(e) = self.record_lease(&lease, fence).await {
                            warn!(error = %e, "could not record lease attributes");
                        }
                        Executed::Event(Event::LeaseAcquired { lease })
                    }
                    Err(e) => {
                        // Starting may have partially succeeded: stop now.
                        self.release_lease(provider.as_ref(), &lease, fence)
                            .await
                            .ok();
                        Self::failed(format!("acquiring the lease failed: {e}"))
                    }
                }
            }
            Action::StartTraining { attempt, version } => {
                let Some(dataset) = &run.dataset else {
                    return Self::failed("internal error: training without a dataset");
                };
                let request = training_request(run, attempt, dataset);
                debug_assert_eq!(request.dataset_version, version);
                info!(attempt, version = %version, trainer = %binding.trainer.describe(), "starting training");
                match binding.trainer.start(&request).await {
                    Ok(handle) => Executed::Event(Event::TrainingStarted { handle }),
                    Err(e) => Self::failed(format!("starting training failed: {e}")),
                }
            }
            Action::AwaitTraining { attempt, handle } => {
                let Some(dataset) = &run.dataset else {
                    return Self::failed("internal error: training without a dataset");
                };
                let request = training_request(run, attempt, dataset);
                let wait = tokio::time::timeout(
                    binding.train_timeout,
                    binding.trainer.wait(&request, &handle),
                );
                let outcome = tokio::select! {
                    r = wait => r,
                    () = cancel.cancelled() => return Executed::Interrupted,
                };
                match outcome {
                    Ok(Ok(TrainingOutcome::Finished(candidate))) => {
                        info!(candidate = %candidate.id, metrics = ?candidate.metrics, "training finished");
                        Executed::Event(Event::TrainingFinished { candidate })
                    }
                    Ok(Ok(TrainingOutcome::Lost { reason })) => {
                        warn!(%reason, "training job lost");
                        Executed::Event(Event::TrainingLost { reason })
                    }
                    Ok(Err(e)) => Self::failed(format!("training failed: {e}")),
                    Err(_) => {
                        if let Err(e) = binding.trainer.cancel(&handle).await {
                            warn!(error = %e, "could not stop the timed-out training job");
                        }
                        Self::failed(format!(
                            "training timed out after {}s",
                            binding.train_timeout.as_secs()
                        ))
                    }
                }
            }
            Action::ReadBaseline => {
                let Some(registry) = &binding.registry else {
                    return Self::failed("the gate needs a model registry but none is configured");
                };
                match registry.production(active_lease(run)).await {
                    Ok(production) => Executed::Event(Event::BaselineRead { production }),
                    Err(e) => Self::failed(format!(
                        "reading the production model from {} failed: {e}",
                        registry.describe()
                    )),
                }
            }
            Action::Promote { candidate } => {
                let Some(registry) = &binding.registry else {
                    return Self::failed("promotion needs a model registry but none is configured");
                };
                match registry
                    .promote(candidate, run.run_id.clone(), active_lease(run))
                    .await
                {
                    Ok(version) => {
                        info!(version = %version.version, "promoted");
                        Executed::Event(Event::Promoted { version })
                    }
                    Err(e) => Self::failed(format!("promotion failed: {e}")),
                }
            }
            Action::ReleaseLease { lease } => {
                let Some(provider) = &binding.lease else {
                    return Self::failed("no lease provider configured to release the lease");
                };
                match self.release_lease(provider.as_ref(), &lease, fence).await {
                    Ok(()) => Executed::Event(Event::LeaseReleased),
                    Err(e) => Self::failed(e),
                }
            }
            Action::Notify => {
                let report = LabelReport::from_run(run, false);
                let mut errors = Vec::new();
                for notifier in &binding.notifiers {
                    if let Err(e) = notifier.notify(&report).await {
                        warn!(notifier = %notifier.describe(), error = %e, "notification failed");
                        errors.push(format!("{}: {e}", notifier.describe()));
                    }
                }
                Executed::Event(Event::Notified {
                    error: (!errors.is_empty()).then(|| errors.join("; ")),
                })
            }
            Action::Commit { cursor } => {
                let Some(fence) = fence else {
                    return Executed::Committed;
                };
                let mut finished = run.clone();
                let from = finished.stage;
                if finished.step(&Event::Committed).is_err() {
                    return Self::failed("internal error: commit outside the finishing stage");
                }
                let transition = self.transition(&finished, from, Event::Committed);
                match self.store.finish(&transition, cursor, fence).await {
                    Ok(()) => {
                        if let Some(outcome) = &run.outcome {
                            info!(outcome = outcome.short(), "run finished");
                        }
                        Executed::Committed
                    }
                    Err(e) => {
                        warn!(error = %e, "could not commit the run; it stays resumable");
                        Executed::CommitFailed(e.to_string())
                    }
                }
            }
        }
    }

    async fn poll(
        &self,
        binding: &LabelBinding,
        run: &LabelRun,
        delay_ms: u64,
        check_prepare: bool,
        cancel: &CancellationToken,
    ) -> Executed {
        if delay_ms > 0 {
            let mut delay = Duration::from_millis(delay_ms);
            delay += jitter(&run.run_id, run.polls, delay, self.settings.poll_jitter);
            // Never sleep past the deadline: the timeout must be honoured.
            if let Some(deadline) = run.poll_deadline() {
                let left = (deadline - self.clock.now()).to_std().unwrap_or_default();
                delay = delay.min(left);
            }
            let waker = self.waker(run.label());
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = waker.notified() => info!("woken early by a webhook"),
                () = cancel.cancelled() => return Executed::Interrupted,
            }
        }
        let known = run.last_seen.as_ref().and_then(|d| d.revision.clone());
        let dataset = match binding.metadata.read(known).await {
            Ok(MetadataRead::Published(dataset)) => Some(dataset),
            Ok(MetadataRead::Unchanged) => run.last_seen.clone(),
            Ok(MetadataRead::Absent) => None,
            Err(PortError::Transient(e)) => {
                warn!(error = %e, "metadata poll failed; will poll again");
                run.last_seen.clone()
            }
            Err(e) => {
                return Self::failed(format!(
                    "reading dataset metadata {} failed: {e}",
                    binding.metadata.describe()
                ))
            }
        };
        let prepare_stage = match (&binding.prepare, check_prepare) {
            (Some(controller), true) => match controller.stage().await {
                Ok(stage) => Some(stage),
                Err(e) => {
                    warn!(error = %e, "could not read the prepare job's stage");
                    None
                }
            },
            _ => None,
        };
        let (current_len, version) = dataset
            .as_ref()
            .map(|d| (d.metadata.num_samples, d.metadata.version_tag.to_string()))
            .unwrap_or((0, "none".into()));
        info!(
            "current_len={current_len} required_len={} version={version} prepare_stage={}",
            run.required_len,
            prepare_stage
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "-".into())
        );
        Executed::Event(Event::Polled {
            now: self.clock.now(),
            dataset,
            prepare_stage,
        })
    }

    /// Stop leases that outlived their `max` or whose run is no longer driven
    /// by a live orchestrator. Returns the leases stopped.
    pub async fn reap_leases(&self, force: bool) -> Result<Vec<Lease>, EngineError> {
        let now = self.clock.now();
        let mut reaped = Vec::new();
        for lease in self.store.active_leases().await? {
            let expired = lease.max_until <= now;
            let orphaned = self.store.lock_holder(&lease.label).await?.is_none();
            if !(force || expired || orphaned) {
                continue;
            }
            let Some(provider) = self.labels.get(&lease.label).and_then(|b| b.lease.clone()) else {
                warn!(lease = %lease.id, label = %lease.label, "cannot reap: label has no lease provider configured");
                continue;
            };
            match self.release_lease(provider.as_ref(), &lease, None).await {
                Ok(()) => {
                    info!(lease = %lease.id, expired, orphaned, "reaped lease");
                    reaped.push(lease);
                }
                Err(e) => warn!(lease = %lease.id, error = %e, "reaping failed"),
            }
        }
        Ok(reaped)
    }

    /// The gate alone (`retrain gate`): candidate metrics from the registry vs
    /// production, optionally forced. With `record`, the evaluation is
    /// journaled as a run of its own (a forced pass shows as forced).
    pub async fn gate_candidate(
        &self,
        label: &Label,
        candidate_id: &str,
        force: bool,
        record: bool,
    ) -> Result<GateOutcome, EngineError> {
        let binding = self.labels.get(label).ok_or_else(|| {
            let known: Vec<&str> = self.labels.keys().map(Label::as_str).collect();
            EngineError::UnknownLabel(label.to_string(), known.join(", "))
        })?;
        let policy = binding
            .plan
            .gate
            .clone()
            .ok_or_else(|| EngineError::NoGate(label.clone()))?;
        let registry = binding
            .registry
            .clone()
            .ok_or_else(|| EngineError::NoRegistry(label.clone()))?;
        let metrics = registry
            .candidate_metrics(candidate_id.to_owned(), None)
            .await?;
        let production = registry.production(None).await?;
        let mut verdict =
            crate::gate::evaluate(&policy, &metrics, production.as_ref().map(|p| &p.metrics));
        if force {
            verdict = verdict.forced();
        }
        let candidate = Candidate {
            id: candidate_id.to_owned(),
            metrics,
        };
        let run_id = if record {
            let cursor = self.store.cursor(label).await?;
            let mut run = LabelRun::new(
                RunId::generate(),
                CycleId::generate(),
                binding.plan.clone(),
                cursor,
            );
            run.manifest = self.settings.manifest.clone();
            let event = Event::GateEvaluated {
                now: self.clock.now(),
                candidate: candidate.clone(),
                production: production.clone(),
                verdict: verdict.clone(),
            };
            // Journaled under the label's lock like every run, so the write is
            // fenced; a label being driven right now is reported busy.
            let fence = match self
                .store
                .try_lock(label, &self.settings.owner, self.settings.lock_ttl)
                .await?
            {
                LockOutcome::Acquired(fence) => fence,
                LockOutcome::Busy { owner, .. } => {
                    return Err(EngineError::Busy(label.clone(), owner))
                }
            };
            let recorded = async {
                self.apply(&mut run, event, Some(&fence)).await?;
                let from = run.stage;
                let _ = run.step(&Event::Committed);
                self.store
                    .finish(&self.transition(&run, from, Event::Committed), None, &fence)
                    .await
            }
            .await;
            self.unlock(label, Some(&fence)).await;
            recorded?;
            Some(run.run_id)
        } else {
            None
        };
        Ok(GateOutcome {
            candidate,
            production,
            verdict,
            run_id,
        })
    }
}

/// What `Engine::gate_candidate` decided.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GateOutcome {
    pub candidate: Candidate,
    pub production: Option<crate::domain::ProductionModel>,
    pub verdict: Verdict,
    /// The journaled run, when recorded.
    pub run_id: Option<RunId>,
}

fn active_lease(run: &LabelRun) -> Option<Lease> {
    run.lease.clone().filter(|_| !run.lease_released)
}

fn training_request(run: &LabelRun, attempt: u32, dataset: &DatasetVersion) -> TrainingRequest {
    TrainingRequest {
        label: run.label().clone(),
        run_id: run.run_id.clone(),
        attempt,
        job_key: JobKey::training(&run.run_id, attempt),
        dataset_name: dataset.metadata.dataset_name.clone(),
        dataset_version: dataset.metadata.version_tag.clone(),
        lease: active_lease(run),
    }
}

/// Deterministic jitter in `[0, fraction × delay)`, derived from the run id
/// and poll count so core needs no RNG and tests stay reproducible.
fn jitter(run_id: &RunId, polls: u32, delay: Duration, fraction: f64) -> Duration {
    use std::hash::{Hash, Hasher};
    if fraction.is_nan() || fraction <= 0.0 {
        return Duration::ZERO;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    run_id.hash(&mut hasher);
    polls.hash(&mut hasher);
    let unit = (hasher.finish() % 10_000) as f64 / 10_000.0;
    delay.mul_f64((unit * fraction).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_bounded_and_varies() {
        let id = RunId::generate();
        let delay = Duration::from_secs(60);
        let values: Vec<Duration> = (0..20).map(|p| jitter(&id, p, delay, 0.1)).collect();
        assert!(values.iter().all(|j| *j < Duration::from_secs(6)));
        assert!(values.iter().any(|j| *j != values[0]));
        assert_eq!(jitter(&id, 1, delay, 0.0), Duration::ZERO);
    }
}
