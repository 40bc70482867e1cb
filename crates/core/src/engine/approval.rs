//! `retrain approve` / `retrain reject`: a human decision on a run parked in
//! `awaiting_approval`, applied as a machine event under the label's lock
//! (fenced like every run write), then driven to its end like a cycle does.
//!
//! Expiry and supersede: under the same lock (phase one of every cycle of a
//! manual label, right after one of its runs started waiting, and before
//! every decision), [`Engine::close_stale_approvals`] closes the waiting
//! runs that can no longer be approved: every one but the newest is
//! `Superseded` by the newest, and the newest is `ApprovalExpired` once it
//! waited longer than the label's `approval_expires`. Both are machine
//! events, journaled and fenced, and the closed run is notified and
//! committed (without moving the cursor) like any other end.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::cycle::Stops;
use super::locks::Acquired;
use super::{CycleShared, Engine, EngineError, LabelBinding};
use crate::domain::{Fence, RunId};
use crate::journal::RunFilter;
use crate::machine::{Action, Event, LabelRun, Outcome, PromoteMode, Stage};
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
        let decided = async {
            // A candidate that waited too long (or was overtaken by a newer
            // one) is closed first, so it cannot be approved any more.
            let interrupt = CancellationToken::new();
            let stops = Stops {
                interrupt: &interrupt,
                lost: lost.clone(),
            };
            // (The caller writes the manifest of the run it decides; those
            // of older runs closed here are rewritten by the next cycle's
            // report, which lists no closed run twice.)
            self.close_stale_approvals(binding, &fence, &CycleShared::default(), &stops)
                .await;
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
                _ => return Err(not_awaiting(&run)),
            }
            self.drive_decided(binding, run, actions, &fence, lost)
                .await
        };
        let result = self.renewing(decided).await;
        self.unlock(&label).await;
        result
    }

    /// Close the waiting candidates of `binding`'s label that can no longer
    /// be approved (see the module doc). The caller holds the label's lock
    /// (`fence`). Failures are logged and leave the runs as they were (the
    /// next cycle tries again); they never stop the caller.
    pub(super) async fn close_stale_approvals(
        &self,
        binding: &LabelBinding,
        fence: &Fence,
        shared: &CycleShared,
        stops: &Stops<'_>,
    ) -> Vec<RunId> {
        let mut closed = Vec::new();
        if binding.plan.promote != PromoteMode::Manual {
            return closed;
        }
        let label = &binding.plan.label;
        let filter = RunFilter {
            label: Some(label.clone()),
            limit: None,
        };
        let runs = match self.store.list_runs(&filter).await {
            Ok(runs) => runs,
            Err(error) => {
                warn!(%error, "could not list the runs awaiting approval; expiry and supersede wait for the next cycle");
                return closed;
            }
        };
        // Newest first (the store's order): the newest waiting run stays.
        let mut waiting = runs
            .into_iter()
            .filter(|r| r.stage == Stage::AwaitingApproval);
        let Some(newest) = waiting.next() else {
            return closed;
        };
        let now = self.clock.now();
        let mut closing: Vec<(RunId, Event)> = waiting
            .map(|older| {
                let event = Event::Superseded {
                    by_run: newest.run_id.clone(),
                    at: now,
                };
                (older.run_id, event)
            })
            .collect();
        let expires = binding.plan.approval_expires;
        // `updated_at` of a waiting run is its verdict's (the commit that
        // parked it, or the last passing re-gate).
        let waited = (now - newest.updated_at).to_std().unwrap_or_default();
        if waited >= expires {
            let reason = format!(
                "not approved within approval_expires = {} (awaiting approval since {})",
                human_duration(expires),
                newest
                    .updated_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            closing.push((newest.run_id, Event::ApprovalExpired { at: now, reason }));
        }
        let everything = |_: &Action| true;
        for (run_id, event) in closing {
            if self.lock_problem(label).is_some() || stops.interrupt.is_cancelled() {
                return closed;
            }
            let mut run = match self.store.run(&run_id).await {
                Ok(Some(detail)) if detail.snapshot.is_awaiting_approval() => detail.snapshot,
                Ok(_) => continue,
                Err(error) => {
                    warn!(%error, run_id = %run_id, "could not read a run awaiting approval");
                    continue;
                }
            };
            let name = event.name();
            match self.apply(&mut run, event, Some(fence)).await {
                Ok(actions) => {
                    info!(run_id = %run_id, event = name, "closed a candidate awaiting approval");
                    closed.push(run_id.clone());
                    self.drive(
                        binding,
                        run,
                        actions,
                        Some(fence),
                        shared,
                        stops,
                        &everything,
                    )
                    .await;
                }
                Err(error) => {
                    warn!(%error, run_id = %run_id, "could not journal the end of a run awaiting approval");
                    return closed;
                }
            }
        }
        closed
    }

    pub(super) async fn drive_decided(
        &self,
        binding: &super::LabelBinding,
        run: LabelRun,
        actions: Vec<crate::machine::Action>,
        fence: &crate::domain::Fence,
        lost: CancellationToken,
    ) -> Result<DecisionOutcome, EngineError> {
        let (run, _ended) = self.drive_alone(binding, run, actions, fence, lost).await;
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

/// Why `run` cannot be decided: closed by expiry or supersede (it can never
/// be approved), or simply not waiting.
fn not_awaiting(run: &LabelRun) -> EngineError {
    let run_id = run.run_id.clone();
    match &run.outcome {
        Some(Outcome::Expired { reason }) => EngineError::ApprovalClosed {
            run: run_id,
            why: format!("it expired, {reason}"),
        },
        Some(Outcome::Superseded { by_run }) => EngineError::ApprovalClosed {
            run: run_id,
            why: format!(
                "it was superseded by run {by_run}, a newer passed candidate of label {} (decide that one instead; see `retrain approvals`)",
                run.label()
            ),
        },
        Some(outcome) => EngineError::NotAwaitingApproval(run_id, outcome.short().to_owned()),
        None => EngineError::NotAwaitingApproval(run_id, run.stage.as_str().to_owned()),
    }
}

/// `7d`, `36h`, `90m`, `45s`: the largest unit that divides `d` (config style).
pub(crate) fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 {
        return format!("{}ms", d.as_millis());
    }
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs >= size && secs.is_multiple_of(size) {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

#[cfg(test)]
mod tests {
    use super::human_duration;
    use std::time::Duration;

    #[test]
    fn durations_read_like_the_config() {
        assert_eq!(human_duration(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(human_duration(Duration::from_secs(36 * 3600)), "36h");
        assert_eq!(human_duration(Duration::from_secs(90 * 60)), "90m");
        assert_eq!(human_duration(Duration::from_secs(45)), "45s");
        assert_eq!(human_duration(Duration::from_secs(0)), "0s");
        assert_eq!(human_duration(Duration::from_millis(1500)), "1500ms");
    }
}
