//! `retrain approve` / `retrain reject`: a human decision on a run parked in
//! `awaiting_approval`, applied as a machine event under the label's lock
//! (fenced like every run write), then driven to its end like a cycle does.

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::cycle::Stops;
use super::locks::Acquired;
use super::{CycleShared, Engine, EngineError};
use crate::domain::RunId;
use crate::machine::{Event, LabelRun, Stage};
use crate::report::LabelReport;

/// What a human decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Promote; with `regate`, gate again against the current production
    /// first (a now-worse candidate is rejected).
    Approve {
        regate: bool,
    },
    Reject,
}

/// What `Engine::decide` did.
#[derive(Debug, Clone, PartialEq)]
pub enum DecisionOutcome {
    /// The decision was applied (or a crashed approval was completed).
    Applied(Box<LabelReport>),
    /// The run was approved before: nothing was done again.
    AlreadyApproved { by: String, at: DateTime<Utc> },
}

impl Engine {
    /// Apply `decision` by `by` (with `reason`) to the run `run_id`.
    ///
    /// Idempotent: a run already approved reports who approved it and when;
    /// a run whose approval crashed mid-promotion resumes its pending
    /// promotion (the registry is idempotent per run id). Refused, changing
    /// nothing, when the run is not awaiting approval, or (approve without
    /// `regate`) when production changed since the verdict.
    pub async fn decide(
        &self,
        run_id: &RunId,
        decision: Decision,
        by: &str,
        reason: Option<String>,
    ) -> Result<DecisionOutcome, EngineError> {
        let detail = self
            .store
            .run(run_id)
            .await?
            .ok_or_else(|| EngineError::NoSuchRun(run_id.clone()))?;
        let label = detail.snapshot.label().clone();
        let binding = self
            .labels
            .get(&label)
            .ok_or_else(|| self.unknown(&label))?;
        let (fence, lost) = match self.acquire(&label).await? {
            Acquired::Held(fence, lost) => (fence, lost),
            Acquired::Busy(owner) => return Err(EngineError::Busy(label, owner)),
        };
        let result = async {
            // Re-read under the lock: the journal is the truth.
            let mut run: LabelRun = self
                .store
                .run(run_id)
                .await?
                .ok_or_else(|| EngineError::NoSuchRun(run_id.clone()))?
                .snapshot;
            let mut actions = run.pending.clone();
            match (run.stage, &run.approval) {
                (Stage::Done, Some(a)) if decision != Decision::Reject => {
                    return Ok(DecisionOutcome::AlreadyApproved {
                        by: a.by.clone(),
                        at: a.at,
                    })
                }
                (Stage::AwaitingApproval, _) => {
                    let now = self.clock.now();
                    let event = match &decision {
                        Decision::Reject => Event::Rejected {
                            by: by.to_owned(),
                            reason: reason.clone().unwrap_or_default(),
                            at: now,
                        },
                        Decision::Approve { regate } => {
                            let registry = binding
                                .registry
                                .clone()
                                .ok_or_else(|| EngineError::NoRegistry(label.clone()))?;
                            let production = registry.production(None).await?;
                            let recorded = run.baseline.as_ref().map(|b| b.version.clone());
                            let current = production.as_ref().map(|p| p.version.clone());
                            if recorded != current && !regate {
                                return Err(EngineError::ProductionChanged {
                                    run: run_id.clone(),
                                    recorded: recorded.unwrap_or_else(|| "none".into()),
                                    current: current.unwrap_or_else(|| "none".into()),
                                });
                            }
                            if *regate {
                                let policy = run
                                    .plan
                                    .gate
                                    .clone()
                                    .ok_or_else(|| EngineError::NoGate(label.clone()))?;
                                let metrics = run
                                    .candidate
                                    .as_ref()
                                    .map(|c| c.metrics.clone())
                                    .unwrap_or_default();
                                let verdict = crate::gate::evaluate(
                                    &policy,
                                    &metrics,
                                    production.as_ref().map(|p| &p.metrics),
                                );
                                let passed = verdict.passed;
                                actions = self
                                    .apply(
                                        &mut run,
                                        Event::Regated {
                                            production,
                                            verdict,
                                        },
                                        Some(&fence),
                                    )
                                    .await?;
                                if !passed {
                                    return self
                                        .drive_decided(binding, run, actions, &fence, lost)
                                        .await;
                                }
                            }
                            Event::Approved {
                                by: by.to_owned(),
                                reason: reason.clone(),
                                at: now,
                            }
                        }
                    };
                    actions = self.apply(&mut run, event, Some(&fence)).await?;
                }
                // An approval that crashed before its end: finish it.
                (Stage::Promoting | Stage::Notifying | Stage::Finishing, Some(_))
                    if decision != Decision::Reject => {}
                _ => {
                    return Err(EngineError::NotAwaitingApproval(
                        run_id.clone(),
                        match &run.outcome {
                            Some(o) => o.short().to_owned(),
                            None => run.stage.as_str().to_owned(),
                        },
                    ))
                }
            }
            self.drive_decided(binding, run, actions, &fence, lost)
                .await
        }
        .await;
        self.unlock(&label).await;
        result
    }

    pub(super) async fn drive_decided(
        &self,
        binding: &super::LabelBinding,
        run: LabelRun,
        actions: Vec<crate::machine::Action>,
        fence: &crate::domain::Fence,
        lost: CancellationToken,
    ) -> Result<DecisionOutcome, EngineError> {
        let interrupt = CancellationToken::new();
        let stops = Stops {
            interrupt: &interrupt,
            lost,
        };
        let shared = CycleShared::default();
        let everything = |_: &crate::machine::Action| true;
        let (run, _, _ended) = self
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
        let mut report = LabelReport::from_run(&run, true);
        if !run.is_done() && report.error.is_none() {
            report.error = Some(format!(
                "the decision is journaled; the run stopped at stage {} and resumes at the next cycle or approve",
                run.stage
            ));
        }
        Ok(DecisionOutcome::Applied(Box::new(report)))
    }
}
