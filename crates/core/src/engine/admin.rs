//! What runs outside a cycle: `retrain gate` (the gate alone, journaled as
//! a run of its own under the label's lock) and `retrain infra reap`.

use tracing::{info, warn};

use super::locks::Acquired;
use super::{Engine, EngineError};
use crate::domain::{Candidate, CycleId, Label, Lease, RunId};
use crate::gate::Verdict;
use crate::machine::{Event, LabelRun};

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
            let fence = match self.acquire(label).await? {
                Acquired::Held(fence, _) => fence,
                Acquired::Busy(owner) => return Err(EngineError::Busy(label.clone(), owner)),
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
            self.unlock(label).await;
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
