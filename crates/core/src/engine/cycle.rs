//! A cycle: phase one (lock, load or create, read-only steps) for every
//! label, then phase two (drive every run to its end), under one heartbeat.
//!
//! **Invariant (journal before acting):** for every transition, the new
//! state with its pending actions is written to the store before any of
//! those actions runs; the pending actions are the *intents* (a
//! `StartTraining` carries its job key). A resumed run re-executes exactly
//! its pending actions, and the ports that start something are idempotent
//! for the intent's key, so a crash at any point ends in the same final
//! state with no side effect repeated (`tests/it/engine.rs` crashes after
//! every write; `tests/tests/fault_campaign.rs` aborts the real binary
//! between every side effect and its journal write).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use super::locks::Acquired;
use super::started::{announce, Announce, CycleStarted};
use super::{
    running_job, Begun, CycleRequest, CycleShared, DriveEnd, Engine, EngineError, Executed,
    LabelBinding, LabelTask,
};
use crate::domain::{CycleId, Fence, Label, RunId};
use crate::failpoint;
use crate::journal::{LabelStart, Transition};
use crate::machine::{Action, Event, LabelRun, Stage};
use crate::ports::StoreError;
use crate::report::{CycleReport, LabelReport, LabelStatus};

/// What stops a label: the cycle's interrupt, or the loss of its lock.
pub(super) struct Stops<'a> {
    pub interrupt: &'a CancellationToken,
    pub lost: CancellationToken,
}

impl Engine {
    /// Run one cycle (§3) for the requested labels. One label's failure never
    /// stops another; `cancel` interrupts waits and leaves runs resumable.
    ///
    /// Two phases: first every label is locked and counted and records the
    /// version currently published (reads only); then all labels are driven
    /// to the end. So a prepare job shared by several labels is restarted
    /// once, after *every* label has recorded the version it must replace.
    /// The heartbeat renews every lock taken, from phase one on.
    pub async fn run_cycle(
        &self,
        request: CycleRequest,
        cancel: CancellationToken,
    ) -> Result<CycleReport, EngineError> {
        self.run_cycle_announced(request, cancel, None, None).await
    }

    /// [`Engine::run_cycle`], sending each label's run id (or why it has
    /// none) to `started` as soon as phase one is over, while the runs go
    /// on (see `started.rs`). `triggered_by` is recorded in the manifest of
    /// every run the cycle creates.
    pub async fn run_cycle_announcing(
        &self,
        request: CycleRequest,
        cancel: CancellationToken,
        started: tokio::sync::oneshot::Sender<CycleStarted>,
        triggered_by: Option<String>,
    ) -> Result<CycleReport, EngineError> {
        self.run_cycle_announced(request, cancel, Some(started), triggered_by)
            .await
    }

    async fn run_cycle_announced(
        &self,
        request: CycleRequest,
        cancel: CancellationToken,
        started: Announce,
        triggered_by: Option<String>,
    ) -> Result<CycleReport, EngineError> {
        let labels = self.select_labels(&request)?;
        let cycle_id = CycleId::generate();
        let started_at = self.clock.now();
        let shared = CycleShared {
            triggered_by,
            watermarks: self.count_watermarks(&labels).await,
            ..CycleShared::default()
        };
        let span = info_span!("run", run_id = %cycle_id, dry_run = request.dry_run);
        let parallel = self.settings.max_parallel_labels.max(1);
        let work = async {
            // Owned labels: a closure over `&Label` makes the cycle's future
            // not `Send` for every lifetime (rustc #110338), so that a server
            // could not spawn it.
            let begun: Vec<Begun> = in_label_order(
                stream::iter(labels.iter().cloned().enumerate().map(|(i, label)| {
                    let span = info_span!("label", label = %label);
                    let (cycle_id, shared, cancel) = (&cycle_id, &shared, &cancel);
                    async move {
                        let begun = self
                            .begin_label(&label, cycle_id, request.dry_run, shared, cancel)
                            .await;
                        (i, begun)
                    }
                    .instrument(span)
                }))
                .buffer_unordered(parallel)
                .collect()
                .await,
            );
            announce(started, &cycle_id, &begun);
            in_label_order(
                stream::iter(begun.into_iter().enumerate().map(|(i, begun)| {
                    let (shared, cancel) = (&shared, &cancel);
                    async move {
                        let report = match begun {
                            Begun::Done(report) => *report,
                            Begun::Task(task) => {
                                let span = info_span!("label", label = %task.run.label());
                                self.finish_label(*task, shared, cancel)
                                    .instrument(span)
                                    .await
                            }
                        };
                        (i, report)
                    }
                }))
                .buffer_unordered(parallel)
                .collect()
                .await,
            )
        };
        let reports = async {
            tokio::select! {
                reports = work => reports,
                () = self.heartbeat() => unreachable!("the heartbeat never ends"),
            }
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

    /// The watermark of every counts-triggered label of `labels` (one
    /// `RunStore::cursors` read), so that the cycle counts them all with one
    /// `CountSource::counts_per_label`. Empty without a count source or
    /// when the read fails (each label then counts at its own watermark as
    /// it gets there, one read per distinct watermark).
    async fn count_watermarks(&self, labels: &[Label]) -> BTreeMap<Label, DateTime<Utc>> {
        if self.counts.is_none() {
            return BTreeMap::new();
        }
        let counted: Vec<Label> = labels
            .iter()
            .filter(|l| {
                matches!(
                    self.labels[*l].plan.trigger,
                    crate::machine::Trigger::Counts { .. }
                )
            })
            .cloned()
            .collect();
        if counted.is_empty() {
            return BTreeMap::new();
        }
        match self.store.cursors(&counted).await {
            Ok(cursors) if cursors.len() == counted.len() => counted
                .into_iter()
                .zip(cursors)
                .map(|(label, cursor)| (label, cursor.watermark_or_epoch()))
                .collect(),
            Ok(_) => BTreeMap::new(),
            Err(error) => {
                warn!(%error, "could not read the labels' watermarks; counting label by label");
                BTreeMap::new()
            }
        }
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
        let fail = |error: String| {
            Begun::done(LabelReport::failed_before_run(
                label.clone(),
                threshold,
                error,
            ))
        };
        // Dry-run: reads only, no lock, nothing journaled, always fresh.
        let (fence, lost) = if dry_run {
            (None, CancellationToken::new())
        } else {
            match self.acquire(label).await {
                Ok(Acquired::Held(fence, lost)) => (Some(fence), lost),
                Ok(Acquired::Busy(owner)) => {
                    return Begun::done(LabelReport::busy(label.clone(), threshold, owner))
                }
                Err(e) => return fail(e.to_string()),
            }
        };
        let mut closed = Vec::new();
        if let Some(fence) = &fence {
            // Waiting candidates past `approval_expires` or overtaken by a
            // newer one are closed under this lock, before anything else.
            let stops = Stops {
                interrupt: cancel,
                lost: lost.clone(),
            };
            closed = self
                .close_stale_approvals(binding, fence, shared, &stops)
                .await;
        }
        let fail = |error: String| {
            let mut report = LabelReport::failed_before_run(label.clone(), threshold, error);
            report.closed_runs = closed.clone();
            Begun::done(report)
        };
        // Under the lock: the unfinished run or the cursor, one read.
        let start = if dry_run {
            self.store.cursor(label).await.map(LabelStart::Fresh)
        } else {
            self.store.label_start(label).await
        };
        let (mut run, resumed) = match start {
            Ok(LabelStart::Resume(run)) => {
                info!(run_id = %run.run_id, stage = %run.stage, "resuming unfinished run");
                (*run, true)
            }
            Ok(LabelStart::Fresh(cursor)) => {
                let mut plan = binding.plan.clone();
                plan.dry_run = dry_run;
                let mut run = LabelRun::new(RunId::generate(), cycle_id.clone(), plan, cursor);
                run.manifest = self.settings.manifest.clone();
                run.manifest.trainer = Some(binding.trainer.describe());
                run.manifest.triggered_by = shared.triggered_by.clone();
                (run, false)
            }
            Err(e) => {
                self.unlock(label).await;
                return fail(e.to_string());
            }
        };
        if fence.is_some() {
            // Its commit, once it is done, releases the lock (see `locks`).
            self.locks.bind_run(label, &run.run_id);
        }
        let mut unwritten = Vec::new();
        let actions = if resumed {
            run.pending.clone()
        } else {
            let event = Event::Started {
                now: self.clock.now(),
            };
            // Buffered with the reads that follow (see `apply_batched`).
            match self
                .apply_batched(&mut run, event, fence.as_ref(), &mut unwritten, false)
                .await
            {
                Ok(actions) => actions,
                Err(error) => {
                    self.unlock(label).await;
                    return fail(format!("could not journal the start of the run: {error}"));
                }
            }
        };
        let read_only = |a: &Action| matches!(a, Action::ReadCounts { .. } | Action::ReadPublished);
        let stops = Stops {
            interrupt: cancel,
            lost,
        };
        let (run, actions, ended) = self
            .drive_buffered(
                binding,
                (run, unwritten),
                actions,
                fence.as_ref(),
                shared,
                &stops,
                &read_only,
            )
            .await;
        Begun::Task(Box::new(LabelTask {
            run,
            actions,
            ended,
            resumed,
            fence,
            lost: stops.lost,
            closed,
        }))
    }

    /// Phase two: drive the run to its end (the heartbeat keeps its lock).
    async fn finish_label(
        &self,
        task: LabelTask,
        shared: &CycleShared,
        cancel: &CancellationToken,
    ) -> LabelReport {
        let LabelTask {
            run,
            actions,
            ended,
            resumed,
            fence,
            lost,
            mut closed,
        } = task;
        let label = run.label().clone();
        let binding = &self.labels[&label];
        let (run, ended) = if ended == DriveEnd::Halted {
            let stops = Stops {
                interrupt: cancel,
                lost: lost.clone(),
            };
            let (run, actions) = match &fence {
                Some(fence) if resumed => {
                    self.renew_lease_on_resume(binding, run, actions, fence)
                        .await
                }
                _ => (run, actions),
            };
            let everything = |_: &Action| true;
            let (run, _, ended) = self
                .drive(
                    binding,
                    run,
                    actions,
                    fence.as_ref(),
                    shared,
                    &stops,
                    &everything,
                )
                .await;
            (run, ended)
        } else {
            (run, ended)
        };
        if let (Some(fence), true) = (&fence, run.is_awaiting_approval()) {
            // This run's candidate now waits: it supersedes an older one.
            let stops = Stops {
                interrupt: cancel,
                lost,
            };
            closed.extend(
                self.close_stale_approvals(binding, fence, shared, &stops)
                    .await,
            );
        }
        self.unlock(&label).await;
        let mut report = self
            .with_history(&run, LabelReport::from_run(&run, resumed), false)
            .await;
        report.closed_runs = closed;
        self.forget_run(&run.run_id);
        report_end(report, &run, ended)
    }

    /// Drive a run outside a cycle (`approve`, `rollback`) to its end, with
    /// every action allowed and no interrupt; the caller holds the lock.
    pub(super) async fn drive_alone(
        &self,
        binding: &LabelBinding,
        run: LabelRun,
        actions: Vec<Action>,
        fence: &Fence,
        lost: CancellationToken,
    ) -> (LabelRun, DriveEnd) {
        let interrupt = CancellationToken::new();
        let stops = Stops {
            interrupt: &interrupt,
            lost,
        };
        let shared = CycleShared::default();
        let everything = |_: &Action| true;
        let (run, _, ended) = self
            .drive(
                binding,
                run,
                actions,
                Some(fence),
                &shared,
                &stops,
                &everything,
            )
            .await;
        (run, ended)
    }
}

/// `report` of `run` with the status and error of how driving it `ended`.
pub(super) fn report_end(mut report: LabelReport, run: &LabelRun, ended: DriveEnd) -> LabelReport {
    match ended {
        DriveEnd::Finished | DriveEnd::Halted => {}
        DriveEnd::Interrupted(note) => {
            report.status = LabelStatus::Interrupted;
            if note.is_some() {
                report.error = note;
            }
        }
        DriveEnd::JournalFailed(error) => {
            report.status = LabelStatus::Failed;
            report.error = Some(format!(
                "run store failure, the run stays resumable: {error}"
            ));
        }
        DriveEnd::Deferred(error) => {
            report.status = LabelStatus::Deferred;
            report.error = Some(format!(
                    "{error}; the run resumes at stage {} at the next cycle (failure {} of max_step_retries = {})",
                    run.stage, run.step_retries, run.plan.max_step_retries
                ));
        }
        DriveEnd::LockLost(reason) => {
            report.status = LabelStatus::LockLost;
            report.error = Some(format!(
                "{reason}; stopped without further action (the new holder resumes the run)"
            ));
        }
    }
    report
}

impl Engine {
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
        if !needs_machines || run.lease_released || self.lock_problem(run.label()).is_some() {
            return (run, actions);
        }
        // Still active in the store (the orchestrator died with it running):
        // nothing stopped the machines, nothing to renew.
        match self.store.active_leases().await {
            Ok(active) if active.iter().any(|l| l.id == lease.id) => return (run, actions),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not read active leases; renewing to be safe"),
        }
        let mut renewing = (*lease).clone();
        renewing.released_at = None;
        if let Err(e) = self.store.put_lease(&renewing, fence).await {
            // Without the record nothing would stop the machines: don't start them.
            warn!(error = %e, "could not record the lease before renewing it");
            return (run, Vec::new());
        }
        let event = match provider.acquire(renewing).await {
            Ok(lease) => {
                failpoint::hit("after-effect:renew_lease");
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

    /// Execute `actions` and the ones that follow until the run is done,
    /// interrupted, deferred, the journal fails, the lock is lost, or the
    /// next action does not satisfy `allowed` (then it is returned, not
    /// executed). `run` comes with the transitions stepped but not written
    /// yet (see [`Engine::apply_batched`]); every exit but a lost lock
    /// writes them first.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn drive(
        &self,
        binding: &LabelBinding,
        run: LabelRun,
        actions: Vec<Action>,
        fence: Option<&Fence>,
        shared: &CycleShared,
        stops: &Stops<'_>,
        allowed: &(dyn Fn(&Action) -> bool + Sync),
    ) -> (LabelRun, Vec<Action>, DriveEnd) {
        let run = (run, Vec::new());
        self.drive_buffered(binding, run, actions, fence, shared, stops, allowed)
            .await
    }

    /// [`Engine::drive`] for a run that comes with transitions stepped but
    /// not written yet.
    #[allow(clippy::too_many_arguments)]
    async fn drive_buffered(
        &self,
        binding: &LabelBinding,
        (mut run, mut unwritten): (LabelRun, Vec<Transition>),
        mut actions: Vec<Action>,
        fence: Option<&Fence>,
        shared: &CycleShared,
        stops: &Stops<'_>,
        allowed: &(dyn Fn(&Action) -> bool + Sync),
    ) -> (LabelRun, Vec<Action>, DriveEnd) {
        while let Some(action) = actions.first().cloned() {
            if !allowed(&action) {
                if let Err(error) = self.flush(fence, &mut unwritten).await {
                    let end = self.journal_failure(&run, fence, error);
                    return (run, Vec::new(), end);
                }
                return (run, actions, DriveEnd::Halted);
            }
            // Fencing, engine side: nothing runs once the lock is in doubt.
            if fence.is_some() {
                if let Some(reason) = self.lock_problem(run.label()) {
                    return (run, Vec::new(), DriveEnd::LockLost(reason));
                }
            }
            let stage = run.stage;
            // Interrupted: stop at this boundary, except for the steps that
            // finish what is under way (persisting the end, stopping machines).
            let must_finish = matches!(action, Action::Commit { .. } | Action::ReleaseLease { .. });
            if stops.interrupt.is_cancelled() && !must_finish {
                self.flush_before_stopping(fence, &mut unwritten).await;
                let end = self.interrupted(binding, &mut run, fence).await;
                return (run, Vec::new(), end);
            }
            // Reads may be abandoned mid-flight; side effects run to their
            // outcome so that it can be journaled (a dropped `StartTraining`
            // could leave a job nobody knows about).
            let abandonable = matches!(
                action,
                Action::ReadCounts { .. } | Action::ReadPublished | Action::ReadBaseline
            );
            let awaited = match &action {
                Action::AwaitTraining { handle, .. } => Some(handle.clone()),
                _ => None,
            };
            let execution = self
                .execute(binding, &run, action, shared, stops, fence, &mut unwritten)
                .instrument(info_span!("stage", stage = %stage));
            let executed = if abandonable {
                tokio::select! {
                    executed = execution => executed,
                    () = stops.interrupt.cancelled() => Executed::Interrupted,
                    () = stops.lost.cancelled() => Executed::LockLost(
                        self.lock_problem(run.label()).unwrap_or_else(|| "lock lost".into())
                    ),
                }
            } else {
                execution.await
            };
            // The manifest records how the job ended (journaled with the
            // transition that ends the wait).
            if let Some(exit) = awaited.and_then(|h| binding.trainer.job_exit(&h)) {
                run.manifest.trainer_exit = Some(exit);
            }
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
                    self.flush_before_stopping(fence, &mut unwritten).await;
                    let end = self.interrupted(binding, &mut run, fence).await;
                    return (run, Vec::new(), end);
                }
                Executed::LockLost(reason) => {
                    return (run, Vec::new(), DriveEnd::LockLost(reason));
                }
            };
            let deferral = matches!(event, Event::StepDeferred { .. });
            // A job whose start was all of it: its handle goes with its
            // outcome, the wait in between being no more than a read.
            let carried = matches!(event, Event::TrainingStarted { .. })
                && binding.trainer.start_is_the_job();
            match self
                .apply_batched(&mut run, event, fence, &mut unwritten, carried)
                .await
            {
                Ok(_) if deferral && run.is_deferred() => {
                    // A deferral is not a read and its next action is the
                    // step it retries, never the commit: `apply_batched`
                    // wrote it, nothing is left unwritten.
                    debug_assert!(
                        unwritten.is_empty(),
                        "a deferral left {} transitions unwritten",
                        unwritten.len()
                    );
                    let error = run.step_error.clone().unwrap_or_default();
                    warn!(%error, stage = %run.stage, "step failed transiently; the run resumes here next cycle");
                    return (run, Vec::new(), DriveEnd::Deferred(error));
                }
                Ok(next) => actions = next,
                Err(error) => {
                    let end = self.journal_failure(&run, fence, error);
                    return (run, Vec::new(), end);
                }
            }
        }
        if let Err(error) = self.flush(fence, &mut unwritten).await {
            let end = self.journal_failure(&run, fence, error);
            return (run, Vec::new(), end);
        }
        (run, Vec::new(), DriveEnd::Finished)
    }

    /// How a failed journal write ends the drive: fenced off → the lock is
    /// lost; anything else → the run stays resumable at its last write.
    fn journal_failure(
        &self,
        run: &LabelRun,
        fence: Option<&Fence>,
        error: StoreError,
    ) -> DriveEnd {
        match error {
            StoreError::Fenced(detail) => DriveEnd::LockLost(match fence {
                Some(fence) => self.fenced(run.label(), fence, &StoreError::Fenced(detail)),
                None => detail,
            }),
            error => {
                warn!(%error, "stopping label: the journal could not be written");
                DriveEnd::JournalFailed(error.to_string())
            }
        }
    }

    /// Step the machine and journal the transition, batching what only reads.
    ///
    /// **Journal before acting** needs an intent durable before its side
    /// effect and a side effect's result durable before the next decision
    /// acts on it; a read (counts, published version, a poll) has no effect
    /// outside. So a transition caused by a read whose next actions are
    /// reads again is kept in `unwritten` and written, in one
    /// [`RunStore::record_all`](crate::ports::RunStore::record_all), with the
    /// first transition whose next action is not a read (or when the drive
    /// stops). A crash before that write loses only reads, which the resumed
    /// run repeats. A poll that changed nothing but the poll counter (the
    /// dataset is still the one last seen, the same poll is pending) is not
    /// written at all: the stored state already says "poll again". A
    /// transition whose only next action is the commit is kept too: the
    /// commit is itself the run's last write
    /// ([`RunStore::finish_all`](crate::ports::RunStore::finish_all)), and
    /// it carries it, so the result of the step before (the notification,
    /// say) is durable before anything else is decided, in one write, not
    /// two. `carried`: the caller knows the next write carries this
    /// transition too (the handle of a job whose start was all of it,
    /// [`Trainer::start_is_the_job`](crate::ports::Trainer::start_is_the_job)).
    pub(super) async fn apply_batched(
        &self,
        run: &mut LabelRun,
        event: Event,
        fence: Option<&Fence>,
        unwritten: &mut Vec<Transition>,
        carried: bool,
    ) -> Result<Vec<Action>, StoreError> {
        let Some(fence) = fence else {
            return self.apply(run, event, None).await;
        };
        let before_poll = matches!(event, Event::Polled { .. }).then(|| run.clone());
        let from = run.stage;
        let read_result = matches!(
            event,
            Event::Started { .. }
                | Event::CountsRead { .. }
                | Event::PublishedRead { .. }
                | Event::Polled { .. }
        );
        let actions = Self::step_or_fail(run, &event);
        if before_poll.is_some_and(|before| nothing_new(&before, run)) {
            return Ok(actions);
        }
        unwritten.push(self.transition(run, from, event));
        let reads_next = !actions.is_empty() && actions.iter().all(is_read);
        // The commit is itself a write, which carries what is unwritten.
        let commits_next = matches!(actions.as_slice(), [Action::Commit { .. }]);
        let carried_by_next_write = (read_result && reads_next) || commits_next || carried;
        if !carried_by_next_write {
            self.flush(Some(fence), unwritten).await?;
        }
        Ok(actions)
    }

    /// Write the transitions stepped but not written yet, as one write.
    async fn flush(
        &self,
        fence: Option<&Fence>,
        unwritten: &mut Vec<Transition>,
    ) -> Result<(), StoreError> {
        let Some(fence) = fence else {
            unwritten.clear();
            return Ok(());
        };
        let written = match unwritten.as_slice() {
            [] => return Ok(()),
            [one] => self.store.record(one, fence).await,
            all => self.store.record_all(all, fence).await,
        };
        let transitions = std::mem::take(unwritten);
        written?;
        self.new_intents.journaled(&transitions, fence);
        for transition in transitions {
            self.audit_step(&transition.snapshot, transition.from, &transition.event);
            failpoint::hit_lazy("after-journal", || transition.event.name());
        }
        Ok(())
    }

    /// Stopping anyway (interrupt): keep what was read, if the store lets us.
    async fn flush_before_stopping(&self, fence: Option<&Fence>, unwritten: &mut Vec<Transition>) {
        if let Err(error) = self.flush(fence, unwritten).await {
            warn!(%error, "could not journal the last reads before stopping; the resumed run repeats them");
        }
    }

    fn step_or_fail(run: &mut LabelRun, event: &Event) -> Vec<Action> {
        match run.step(event) {
            Ok(actions) => actions,
            Err(invalid) => {
                warn!(%invalid, "state machine refused an event; failing the label");
                run.step(&Event::ActionFailed {
                    reason: format!("internal error: {invalid}"),
                })
                .unwrap_or_default()
            }
        }
    }

    /// Step the machine and journal the transition before anything acts on it.
    pub(super) async fn apply(
        &self,
        run: &mut LabelRun,
        event: Event,
        fence: Option<&Fence>,
    ) -> Result<Vec<Action>, StoreError> {
        let from = run.stage;
        let actions = Self::step_or_fail(run, &event);
        if let Some(fence) = fence {
            let transition = self.transition(run, from, event);
            self.store.record(&transition, fence).await?;
            self.new_intents.journaled([&transition], fence);
            self.audit_step(run, from, &transition.event);
            failpoint::hit_lazy("after-journal", || transition.event.name());
        } else {
            self.audit_step(run, from, &event);
        }
        Ok(actions)
    }

    pub(super) fn transition(&self, run: &LabelRun, from: Stage, event: Event) -> Transition {
        Transition::after_step(run, from, event, self.clock.now())
    }

    /// Ctrl-C / SIGTERM: stop the training job (journaled as cancelled, so
    /// the resumed run restarts it without counting an attempt) and the
    /// lease; the journal keeps the run resumable at its recorded stage. A
    /// job that outlives this process with no lease holding it
    /// (`Trainer::outlives_interrupt`: a remote worker's, a retrain
    /// Space's) is left running:
    /// the run stays at its pending `AwaitTraining` and the next process
    /// awaits the same job.
    async fn interrupted(
        &self,
        binding: &LabelBinding,
        run: &mut LabelRun,
        fence: Option<&Fence>,
    ) -> DriveEnd {
        let leaves_job_running = binding.trainer.outlives_interrupt() && run.lease.is_none();
        if let Some(handle) = running_job(run).cloned().filter(|_| !leaves_job_running) {
            if let Err(e) = binding.trainer.cancel(&handle).await {
                warn!(error = %e, "could not stop the training job on interrupt");
            }
            failpoint::hit("after-effect:cancel_training");
            let event = Event::TrainingCancelled {
                reason: "interrupted (Ctrl-C/SIGTERM)".into(),
            };
            if let Err(e) = self.apply(run, event, fence).await {
                warn!(error = %e, "could not journal the cancelled training; the resumed run will find it gone");
            }
        }
        let mut note = None;
        if let (Some(lease), Some(provider)) = (&run.lease, &binding.lease) {
            if !run.lease_released {
                if let Err(e) = self
                    .release_lease_with_retries(provider.as_ref(), lease, fence)
                    .await
                {
                    note = Some(format!(
                        "could not stop lease {} ({}): {e}; left to `retrain infra reap`",
                        lease.id,
                        lease.resources.join(", ")
                    ));
                }
            }
        }
        DriveEnd::Interrupted(note)
    }
}

/// Actions that only read: nothing outside changes when they run.
fn is_read(action: &Action) -> bool {
    matches!(
        action,
        Action::ReadCounts { .. } | Action::ReadPublished | Action::Poll { .. }
    )
}

/// Whether a poll left the run as it was, but for its counters: same
/// dataset seen, same decision, same next poll.
fn nothing_new(before: &LabelRun, after: &LabelRun) -> bool {
    let mut before = before.clone();
    before.seq = after.seq;
    before.polls = after.polls;
    before == *after
}

/// The results of a phase, which runs `buffer_unordered`, back in the order
/// of the cycle's labels. (`buffered` kept them in order by holding each
/// finished label's permit until every label before it was done: one slow
/// label idled the permits of those that finished behind it.)
fn in_label_order<T>(mut done: Vec<(usize, T)>) -> Vec<T> {
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, t)| t).collect()
}
