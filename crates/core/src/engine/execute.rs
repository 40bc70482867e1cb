//! Actions → ports, and port outcomes → events.
//!
//! **Retry semantics.** Adapters retry transport errors themselves; what
//! reaches the engine as `PortError::Transient` persisted through those
//! retries. For the steps that talk to a registry, notifiers or a lease
//! provider (`ReadBaseline`, `Promote`, `RollBack`, `Notify`, `ReleaseLease`) such an
//! error becomes `Event::StepDeferred`: the run stays at that step and the
//! next cycle retries it, so a passed verdict is never thrown away by an
//! outage; a permanent error (`Denied`, `NotFound`, `InvalidResponse`…)
//! fails the run. Every side effect is followed by the failpoint
//! `after-effect:<action>` (before its outcome is journaled).

use std::collections::BTreeMap;
use std::time::Duration;

use tracing::{info, warn};

use super::cycle::Stops;
use super::{training_request, CycleShared, Engine, Executed, LabelBinding};
use crate::domain::{Fence, JobKey, Lease, TrainingOutcome, VersionTag};
use crate::failpoint;
use crate::journal::Transition;
use crate::machine::{Action, Event, LabelRun};
use crate::ports::{
    DatasetCheckRequest, LeaseProvider, MetadataRead, PortError, RegistryRollback, StoreError,
};
use crate::report::LabelReport;

/// Attempts at stopping a lease before giving up (the lease then stays
/// recorded as active for `retrain infra reap`).
const RELEASE_ATTEMPTS: u32 = 3;
/// First pause between release attempts (doubled each time).
const RELEASE_BACKOFF: Duration = Duration::from_secs(1);

/// Why a lease could not be released.
#[derive(Debug)]
pub(super) enum ReleaseError {
    Provider(PortError),
    Store(StoreError),
}

impl std::fmt::Display for ReleaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Provider(e) => write!(f, "{e}"),
            Self::Store(e) => write!(f, "recording the released lease failed: {e}"),
        }
    }
}

impl Engine {
    fn failed(reason: impl std::fmt::Display) -> Executed {
        Executed::Event(Event::ActionFailed {
            reason: reason.to_string(),
        })
    }

    /// A port error of a retryable step: deferred if transient, else fatal.
    fn deferred_or_failed(error: PortError, what: String) -> Executed {
        match error {
            PortError::Transient(_) => Executed::Event(Event::StepDeferred {
                error: format!("{what}: {error}"),
                done: Vec::new(),
            }),
            other => Self::failed(format!("{what}: {other}")),
        }
    }

    /// A store error while acting: lock lost if fenced, else the action fails.
    fn store_failed(
        &self,
        run: &LabelRun,
        fence: Option<&Fence>,
        error: StoreError,
        what: &str,
    ) -> Executed {
        match (&error, fence) {
            (StoreError::Fenced(_), Some(fence)) => {
                Executed::LockLost(self.fenced(run.label(), fence, &error))
            }
            _ => Self::failed(format!("{what}: {error}")),
        }
    }

    /// Write a lease record: fenced inside a run, unfenced for `infra reap`.
    pub(super) async fn record_lease(
        &self,
        lease: &Lease,
        fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        match fence {
            Some(fence) => self.store.put_lease(lease, fence).await,
            None => self.store.put_lease_unfenced(lease).await,
        }
    }

    /// Stop the lease's machines, retrying transient failures with backoff
    /// (each one logged), then record it released.
    pub(super) async fn release_lease_with_retries(
        &self,
        provider: &dyn LeaseProvider,
        lease: &Lease,
        fence: Option<&Fence>,
    ) -> Result<(), ReleaseError> {
        let mut pause = RELEASE_BACKOFF;
        let mut attempt = 1;
        loop {
            match provider.release(lease).await {
                Ok(()) => break,
                Err(e @ PortError::Transient(_)) if attempt < RELEASE_ATTEMPTS => {
                    warn!(lease = %lease.id, resources = ?lease.resources, attempt, error = %e, "stopping the lease failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                Err(e) => {
                    warn!(lease = %lease.id, resources = ?lease.resources, attempt, error = %e, "stopping the lease failed");
                    return Err(ReleaseError::Provider(e));
                }
            }
        }
        failpoint::hit("after-effect:release_lease");
        let mut released = lease.clone();
        released.released_at = Some(self.clock.now());
        self.record_lease(&released, fence)
            .await
            .map_err(ReleaseError::Store)?;
        info!(lease = %lease.id, resources = ?lease.resources, "lease released");
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn execute(
        &self,
        binding: &LabelBinding,
        run: &LabelRun,
        action: Action,
        shared: &CycleShared,
        stops: &Stops<'_>,
        fence: Option<&Fence>,
        unwritten: &mut Vec<Transition>,
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
                // The watermark read before the cycle (every counts label
                // at its own, one call), or a read at this one.
                let cell;
                let result = if shared.watermarks.get(run.label()) == Some(&since) {
                    shared
                        .per_label_counts
                        .get_or_init(|| async {
                            info!(
                                labels = shared.watermarks.len(),
                                "reading feedback counts of every label at its watermark"
                            );
                            source.counts_per_label(&shared.watermarks).await
                        })
                        .await
                } else {
                    cell = shared.counts_cell(since);
                    cell.get_or_init(|| async {
                        info!(%since, "reading feedback counts");
                        source.counts(since).await
                    })
                    .await
                };
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
                let intent = JobKey::prepare(&run.cycle_id, &key);
                let result = cell
                    .get_or_init(|| async {
                        info!(job = %controller.describe(), %intent, "restarting prepare job");
                        let restarted = controller.restart(&intent).await;
                        failpoint::hit("after-effect:restart_prepare");
                        restarted
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
                self.poll(binding, run, delay_ms, check_prepare, shared, stops)
                    .await
            }
            Action::AcquireLease { .. } => self.acquire_lease(binding, run, stops, fence).await,
            Action::StartTraining {
                attempt,
                version,
                job_key,
            } => {
                let Some(dataset) = &run.dataset else {
                    return Self::failed("internal error: training without a dataset");
                };
                let mut request = training_request(run, attempt, dataset);
                if let Some(key) = job_key {
                    request.job_key = key;
                }
                request.first_start = self.new_intents.take(&request.job_key, fence);
                debug_assert_eq!(request.dataset_version, version);
                info!(attempt, job = %request.job_key, version = %version, trainer = %binding.trainer.describe(), "starting training");
                match binding.trainer.start(&request).await {
                    Ok(handle) => {
                        failpoint::hit("after-effect:start_training");
                        Executed::Event(Event::TrainingStarted { handle })
                    }
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
                    () = stops.interrupt.cancelled() => return Executed::Interrupted,
                    // The new holder adopts the job: leave it running.
                    () = stops.lost.cancelled() => return Executed::LockLost(
                        self.lock_problem(run.label()).unwrap_or_else(|| "lock lost".into())
                    ),
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
                match registry.production(super::active_lease(run)).await {
                    Ok(production) => Executed::Event(Event::BaselineRead { production }),
                    Err(e) => Self::deferred_or_failed(
                        e,
                        format!(
                            "reading the production model from {} failed",
                            registry.describe()
                        ),
                    ),
                }
            }
            Action::Promote { candidate } => {
                let Some(registry) = &binding.registry else {
                    return Self::failed("promotion needs a model registry but none is configured");
                };
                match registry
                    .promote(candidate, run.run_id.clone(), super::active_lease(run))
                    .await
                {
                    Ok(version) => {
                        failpoint::hit("after-effect:promote");
                        info!(version = %version.version, "promoted");
                        Executed::Event(Event::Promoted { version })
                    }
                    Err(e) => Self::deferred_or_failed(
                        e,
                        format!("promotion in {} failed", registry.describe()),
                    ),
                }
            }
            Action::RollBack { version } => {
                let (Some(registry), Some(rollback)) = (&binding.registry, &run.rollback) else {
                    return Self::failed(
                        "a rollback needs a model registry and a rollback request; this run has neither",
                    );
                };
                let order = RegistryRollback {
                    version,
                    run_id: run.run_id.clone(),
                    by: rollback.by.clone(),
                    reason: rollback.reason.clone(),
                };
                match registry.roll_back(order, None).await {
                    Ok(version) => {
                        failpoint::hit("after-effect:roll_back");
                        info!(version = %version.version, previous = ?version.previous, "rolled back");
                        Executed::Event(Event::RolledBack { version })
                    }
                    Err(e) => Self::deferred_or_failed(
                        e,
                        format!("rollback in {} failed", registry.describe()),
                    ),
                }
            }
            Action::ReleaseLease { lease } => {
                let Some(provider) = &binding.lease else {
                    return Self::failed("no lease provider configured to release the lease");
                };
                match self
                    .release_lease_with_retries(provider.as_ref(), &lease, fence)
                    .await
                {
                    Ok(()) => Executed::Event(Event::LeaseReleased),
                    Err(ReleaseError::Provider(e)) => Self::deferred_or_failed(
                        e,
                        format!(
                            "stopping lease {} ({}) failed",
                            lease.id,
                            lease.resources.join(", ")
                        ),
                    ),
                    Err(ReleaseError::Store(e)) => {
                        self.store_failed(run, fence, e, "recording the released lease failed")
                    }
                }
            }
            Action::Notify => self.notify(binding, run).await,
            Action::CheckDataset { version, job_key } => {
                self.check_dataset(binding, run, version, job_key, stops)
                    .await
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
                // The steps stepped but not written (the one that led
                // here: see `apply_batched`) go in the same write.
                let mut transitions = std::mem::take(unwritten);
                transitions.push(self.transition(&finished, from, Event::Committed));
                // The last write of the run the lock was taken for also
                // releases it (invariant 6 of `locks`).
                let label = run.label();
                let unlocks =
                    finished.is_done() && self.locks.begin_unlock(label, fence, &run.run_id);
                let written = if unlocks {
                    self.store
                        .finish_and_unlock(&transitions, cursor, fence)
                        .await
                } else {
                    self.store.finish_all(&transitions, cursor, fence).await
                };
                if unlocks && written.is_err() {
                    self.locks.abort_unlock(label);
                }
                match written {
                    Ok(()) => {
                        transitions.pop(); // `committed`, audited below
                        for earlier in &transitions {
                            self.audit_step(&earlier.snapshot, earlier.from, &earlier.event);
                            failpoint::hit_lazy("after-journal", || earlier.event.name());
                        }
                        self.audit_step(&finished, from, &Event::Committed);
                        failpoint::hit("after-journal:committed");
                        if let Some(outcome) = &run.outcome {
                            info!(outcome = outcome.short(), "run finished");
                        }
                        Executed::Committed
                    }
                    Err(e @ StoreError::Fenced(_)) => {
                        Executed::LockLost(self.fenced(run.label(), fence, &e))
                    }
                    Err(e) => {
                        warn!(error = %e, "could not commit the run; it stays resumable");
                        Executed::CommitFailed(e.to_string())
                    }
                }
            }
        }
    }

    /// Run the label's dataset check on the accepted version. An interrupt or
    /// the loss of the lock drops the check (the adapter stops it); the
    /// resumed run asks again under the same key.
    async fn check_dataset(
        &self,
        binding: &LabelBinding,
        run: &LabelRun,
        version: VersionTag,
        job_key: JobKey,
        stops: &Stops<'_>,
    ) -> Executed {
        let Some(check) = &binding.dataset_check else {
            return Self::failed("the label's plan has a dataset check but none is configured");
        };
        let Some(dataset) = &run.dataset else {
            return Self::failed("internal error: a dataset check without a dataset");
        };
        let request = DatasetCheckRequest {
            label: run.label().clone(),
            run_id: run.run_id.clone(),
            job_key,
            dataset_name: dataset.metadata.dataset_name.clone(),
            dataset_version: version,
        };
        info!(job = %request.job_key, version = %request.dataset_version, check = %check.describe(), "checking the dataset");
        let checked = tokio::select! {
            r = check.check(&request) => r,
            () = stops.interrupt.cancelled() => return Executed::Interrupted,
            () = stops.lost.cancelled() => return Executed::LockLost(
                self.lock_problem(run.label()).unwrap_or_else(|| "lock lost".into())
            ),
        };
        match checked {
            Ok(result) => {
                failpoint::hit("after-effect:check_dataset");
                if result.passed {
                    info!(version = %request.dataset_version, "dataset check passed");
                } else {
                    warn!(version = %request.dataset_version, "dataset check rejected the dataset");
                }
                Executed::Event(Event::DatasetChecked { result })
            }
            Err(e) => Self::failed(format!(
                "dataset check {} could not check version {}: {e}",
                check.describe(),
                request.dataset_version
            )),
        }
    }

    /// Record the lease, then start its machines (so nothing can leak).
    async fn acquire_lease(
        &self,
        binding: &LabelBinding,
        run: &LabelRun,
        stops: &Stops<'_>,
        fence: Option<&Fence>,
    ) -> Executed {
        let Some(provider) = &binding.lease else {
            return Self::failed("label is leased but no lease provider is configured");
        };
        let plan = provider.plan();
        let now = self.clock.now();
        let lease = Lease {
            // One lease record per run: re-acquiring after a lost attempt
            // updates it instead of leaving an orphan.
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
        if let Err(e) = self.record_lease(&lease, fence).await {
            return self.store_failed(run, fence, e, "could not record the lease");
        }
        let acquired = tokio::select! {
            r = provider.acquire(lease.clone()) => r,
            () = stops.interrupt.cancelled() => {
                if let Err(e) = self.release_lease_with_retries(provider.as_ref(), &lease, fence).await {
                    warn!(lease = %lease.id, error = %e, "could not stop the lease after an interrupted start; left to `retrain infra reap`");
                }
                return Executed::Interrupted;
            }
        };
        match acquired {
            Ok(lease) => {
                failpoint::hit("after-effect:acquire_lease");
                if let Err(e) = self.record_lease(&lease, fence).await {
                    warn!(error = %e, "could not record lease attributes");
                }
                Executed::Event(Event::LeaseAcquired { lease })
            }
            Err(e) => {
                // Starting may have partially succeeded: stop now.
                if let Err(stop) = self
                    .release_lease_with_retries(provider.as_ref(), &lease, fence)
                    .await
                {
                    warn!(lease = %lease.id, error = %stop, "could not stop a partially started lease; left to `retrain infra reap`");
                }
                Self::failed(format!("acquiring the lease failed: {e}"))
            }
        }
    }

    /// Deliver the report to every notifier that has not delivered it yet.
    async fn notify(&self, binding: &LabelBinding, run: &LabelRun) -> Executed {
        let report = self
            .with_history(run, LabelReport::from_run(run, false), true)
            .await;
        let mut delivered = Vec::new();
        let mut transient = Vec::new();
        let mut permanent = Vec::new();
        for notifier in &binding.notifiers {
            let name = notifier.describe();
            if run.notified.contains(&name) {
                continue;
            }
            match notifier.notify(&report).await {
                Ok(()) => {
                    failpoint::hit("after-effect:notify");
                    delivered.push(name);
                }
                Err(e) => {
                    warn!(notifier = %name, error = %e, "notification failed");
                    match e {
                        PortError::Transient(_) => transient.push(format!("{name}: {e}")),
                        _ => permanent.push(format!("{name}: {e}")),
                    }
                }
            }
        }
        if !transient.is_empty() {
            let mut errors = transient;
            errors.extend(permanent);
            return Executed::Event(Event::StepDeferred {
                error: format!("notification failed: {}", errors.join("; ")),
                done: delivered,
            });
        }
        Executed::Event(Event::Notified {
            error: (!permanent.is_empty()).then(|| permanent.join("; ")),
        })
    }
}
