//! What runs outside a cycle: `retrain gate` (the gate alone, journaled as
//! a run of its own under the label's lock) and `retrain infra reap`.

use tracing::{info, warn};

use super::locks::Acquired;
use super::{Engine, EngineError};
use crate::domain::{Candidate, CycleId, Label, Lease, RunId};
use crate::gate::Verdict;
use crate::machine::{Event, LabelRun};
use crate::report::LabelReport;

impl Engine {
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
            match self
                .release_lease_with_retries(provider.as_ref(), &lease, None)
                .await
            {
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
        self.gate(label, candidate_id, force, record, false)
            .await
            .map(|(outcome, _)| outcome)
    }

    /// A candidate the registry announced (an MLflow `model_version.created`
    /// webhook: `candidate_id` names that version): gated against
    /// production like [`Engine::gate_candidate`], journaled as a run of its
    /// own, and, if it passed, promoted in that run (or parked for approval
    /// with `promote = "manual"`); the run is notified like a cycle's. The
    /// registry's promotion is idempotent per run id, so a crash mid-way is
    /// finished by the next cycle, which resumes the run.
    pub async fn gate_and_promote(
        &self,
        label: &Label,
        candidate_id: &str,
    ) -> Result<(GateOutcome, LabelReport), EngineError> {
        let (outcome, report) = self.gate(label, candidate_id, false, true, true).await?;
        let report = report.ok_or_else(|| {
            EngineError::Port(crate::ports::PortError::InvalidResponse(
                "the gated candidate's run was not driven".into(),
            ))
        })?;
        Ok((outcome, *report))
    }

    async fn gate(
        &self,
        label: &Label,
        candidate_id: &str,
        force: bool,
        record: bool,
        promote: bool,
    ) -> Result<(GateOutcome, Option<Box<LabelReport>>), EngineError> {
        let binding = self.labels.get(label).ok_or_else(|| self.unknown(label))?;
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
        let (run_id, report) = if record {
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
                promote,
            };
            // Journaled under the label's lock like every run, so the write is
            // fenced; a label being driven right now is reported busy.
            let (fence, lost) = match self.acquire(label).await? {
                Acquired::Held(fence, lost) => (fence, lost),
                Acquired::Busy(owner) => return Err(EngineError::Busy(label.clone(), owner)),
            };
            let run_id = run.run_id.clone();
            let recorded = self
                .renewing(async {
                    let actions = self.apply(&mut run, event, Some(&fence)).await?;
                    if promote {
                        return self
                            .drive_decided(binding, run, actions, &fence, lost)
                            .await
                            .map(|driven| match driven {
                                super::DecisionOutcome::Applied(report) => Some(report),
                                super::DecisionOutcome::AlreadyApproved { .. } => None,
                            });
                    }
                    let from = run.stage;
                    let _ = run.step(&Event::Committed);
                    self.store
                        .finish(&self.transition(&run, from, Event::Committed), None, &fence)
                        .await?;
                    Ok(None)
                })
                .await;
            self.unlock(label).await;
            (Some(run_id), recorded?)
        } else {
            (None, None)
        };
        Ok((
            GateOutcome {
                candidate,
                production,
                verdict,
                run_id,
            },
            report,
        ))
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
