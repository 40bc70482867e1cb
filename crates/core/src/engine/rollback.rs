//! `retrain rollback`: production back to an earlier registry version, as a
//! run of its own under the label's lock.
//!
//! **Invariant (exactly once, like a promotion):** the request is validated
//! before anything is written (a refusal changes nothing); then the run's
//! creation (`RollbackRequested`, whose pending action `RollBack` is the
//! intent) is journaled before the registry is called, and the result
//! (`RolledBack`, with the promotion event of kind `rollback` in the same
//! fenced write) after. The registry is idempotent per rollback run id, so
//! a crash between the call and its journal write is completed by the next
//! `rollback` (or cycle) without moving production twice. A rollback run
//! trains nothing: its commit carries no cursor, so the label's consumed
//! dataset version stays consumed and the next cycle does not train (and
//! promote) the rolled-back candidate's dataset again.

use serde::Serialize;

use super::cycle::report_end;
use super::locks::Acquired;
use super::{Engine, EngineError, LabelBinding};
use crate::domain::{CycleId, Fence, Label, RunId};
use crate::journal::{PromotionEvent, PromotionKind};
use crate::machine::{Event, LabelRun, Rollback, Stage};
use crate::report::LabelReport;

/// What `retrain rollback` (or `POST /v1/labels/{label}/rollback`) asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackRequest {
    pub label: Label,
    /// The version to restore; `None`: the production version before the
    /// current one (versions a rollback moved away from are skipped).
    pub to_version: Option<String>,
    /// Who rolls back (journaled, shown by `retrain history`).
    pub by: String,
    /// Why (required).
    pub reason: String,
    /// Allow a version that never was production for this label.
    pub force: bool,
}

/// What `Engine::rollback` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RollbackOutcome {
    /// The rollback run's report (status `rolled_back` when it finished).
    pub report: LabelReport,
    /// `true`: an interrupted rollback run of the label was completed
    /// instead of starting a new one (the request was not applied).
    pub resumed: bool,
}

/// Why a rollback was refused. Nothing was journaled or changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RollbackRefused {
    #[error("a rollback needs a reason (--reason TEXT)")]
    MissingReason,
    #[error("a rollback needs to say who rolls back (--as NAME)")]
    MissingActor,
    #[error("label `{label}` has no earlier production version to roll back to ({detail}); name one with --to VERSION")]
    NoPreviousVersion { label: Label, detail: String },
    #[error("version {version} is already production for label `{label}`; nothing to roll back")]
    AlreadyProduction { label: Label, version: String },
    #[error("version {version} never was production for label `{label}` (production so far: {lineage}); pass --force to roll back to it anyway")]
    NeverProduction {
        label: Label,
        version: String,
        lineage: String,
    },
    #[error("{registry} has no version {version}")]
    UnknownVersion { registry: String, version: String },
    #[error("label `{label}` has an unfinished run {run_id} at stage promoting (its promotion may have reached the registry without being journaled); finish it first with `retrain run --label {label}`, then roll back")]
    PromotionInFlight { label: Label, run_id: RunId },
}

/// The versions that were production for the label, oldest first, each
/// once: every event's previous version and new version.
pub fn production_lineage(history: &[PromotionEvent]) -> Vec<String> {
    let mut lineage: Vec<String> = Vec::new();
    for event in history {
        for version in event.previous_version.iter().chain([&event.version]) {
            if !lineage.contains(version) {
                lineage.push(version.clone());
            }
        }
    }
    lineage
}

/// The version a rollback without `--to` restores: walking the history
/// back from the newest change, the first version that was production,
/// is not `current`, and was not itself rolled back from (a rollback of a
/// rollback does not bring the bad version back).
pub fn previous_production(history: &[PromotionEvent], current: Option<&str>) -> Option<String> {
    let rolled_back_from: Vec<&str> = history
        .iter()
        .filter(|e| e.kind == PromotionKind::Rollback)
        .filter_map(|e| e.previous_version.as_deref())
        .collect();
    history
        .iter()
        .rev()
        .flat_map(|e| [Some(e.version.as_str()), e.previous_version.as_deref()])
        .flatten()
        .find(|v| Some(*v) != current && !rolled_back_from.contains(v))
        .map(str::to_owned)
}

impl Engine {
    /// Move `request.label`'s production back to `request.to_version` (or
    /// the previous production version), journaled as a run of its own and
    /// notified like a promotion.
    ///
    /// Refused, changing nothing ([`RollbackRefused`]): without a reason or
    /// actor, with no earlier version, when the target already is
    /// production, when it never was production for the label (unless
    /// `force`), when the registry does not have it, or while a run of the
    /// label may have promoted without journaling it. When the label has an
    /// interrupted rollback run, that run is completed (exactly once) and
    /// returned with `resumed = true` instead.
    pub async fn rollback(&self, request: RollbackRequest) -> Result<RollbackOutcome, EngineError> {
        if request.reason.trim().is_empty() {
            return Err(RollbackRefused::MissingReason.into());
        }
        if request.by.trim().is_empty() {
            return Err(RollbackRefused::MissingActor.into());
        }
        let label = request.label.clone();
        let binding = self
            .labels
            .get(&label)
            .ok_or_else(|| self.unknown(&label))?;
        if binding.registry.is_none() {
            return Err(EngineError::NoRegistry(label));
        }
        let (fence, lost) = match self.acquire(&label).await? {
            Acquired::Held(fence, lost) => (fence, lost),
            Acquired::Busy(owner) => return Err(EngineError::Busy(label, owner)),
        };
        let result = self
            .renewing(self.rollback_locked(binding, request, &fence, lost))
            .await;
        self.unlock(&label).await;
        result
    }

    async fn rollback_locked(
        &self,
        binding: &LabelBinding,
        request: RollbackRequest,
        fence: &Fence,
        lost: tokio_util::sync::CancellationToken,
    ) -> Result<RollbackOutcome, EngineError> {
        let label = &request.label;
        if let Some(unfinished) = self.store.unfinished_run(label).await? {
            if unfinished.rollback.is_some() {
                let actions = unfinished.pending.clone();
                let (run, ended) = self
                    .drive_alone(binding, unfinished, actions, fence, lost)
                    .await;
                let report = report_end(LabelReport::from_run(&run, true), &run, ended);
                return Ok(RollbackOutcome {
                    report,
                    resumed: true,
                });
            }
            if unfinished.stage == Stage::Promoting {
                return Err(RollbackRefused::PromotionInFlight {
                    label: label.clone(),
                    run_id: unfinished.run_id,
                }
                .into());
            }
        }
        let rollback = self.validate_rollback(binding, &request).await?;
        let mut run = LabelRun::new(
            RunId::generate(),
            CycleId::generate(),
            binding.plan.clone(),
            self.store.cursor(label).await?,
        );
        run.manifest = self.settings.manifest.clone();
        let actions = self
            .apply(&mut run, Event::RollbackRequested { rollback }, Some(fence))
            .await?;
        let (run, ended) = self.drive_alone(binding, run, actions, fence, lost).await;
        let report = report_end(LabelReport::from_run(&run, false), &run, ended);
        Ok(RollbackOutcome {
            report,
            resumed: false,
        })
    }

    /// The rollback `request` asks for, checked against the promotion
    /// history and the registry (reads only).
    async fn validate_rollback(
        &self,
        binding: &LabelBinding,
        request: &RollbackRequest,
    ) -> Result<Rollback, EngineError> {
        let label = &request.label;
        let registry = binding
            .registry
            .as_ref()
            .ok_or_else(|| EngineError::NoRegistry(label.clone()))?;
        let history = self.store.promotions(label).await?;
        let current = registry.production(None).await?.map(|p| p.version);
        let lineage = production_lineage(&history);
        let to_version = match &request.to_version {
            Some(version) => version.trim().to_owned(),
            None => previous_production(&history, current.as_deref()).ok_or_else(|| {
                RollbackRefused::NoPreviousVersion {
                    label: label.clone(),
                    detail: if history.is_empty() {
                        "no promotion is recorded".into()
                    } else {
                        format!(
                            "production so far: {}; versions rolled back from are skipped",
                            lineage.join(", ")
                        )
                    },
                }
            })?,
        };
        if current.as_deref() == Some(to_version.as_str()) {
            return Err(RollbackRefused::AlreadyProduction {
                label: label.clone(),
                version: to_version,
            }
            .into());
        }
        let was_production = lineage.contains(&to_version);
        if !was_production && !request.force {
            return Err(RollbackRefused::NeverProduction {
                label: label.clone(),
                version: to_version,
                lineage: if lineage.is_empty() {
                    "none recorded".into()
                } else {
                    lineage.join(", ")
                },
            }
            .into());
        }
        if !registry.version_exists(to_version.clone(), None).await? {
            return Err(RollbackRefused::UnknownVersion {
                registry: registry.describe(),
                version: to_version,
            }
            .into());
        }
        // The run whose promotion first made the target production.
        let restored = history
            .iter()
            .find(|e| e.kind == PromotionKind::Promotion && e.version == to_version);
        Ok(Rollback {
            from_version: current,
            by: request.by.trim().to_owned(),
            reason: request.reason.trim().to_owned(),
            forced: !was_production,
            at: self.clock.now(),
            restored_run: restored.and_then(|e| e.candidate_run.clone()),
            restored_candidate: restored.and_then(|e| e.candidate_id.clone()),
            to_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: PromotionKind, version: &str, previous: Option<&str>) -> PromotionEvent {
        PromotionEvent {
            run_id: RunId::generate(),
            label: Label::new("department").unwrap(),
            kind,
            version: version.into(),
            previous_version: previous.map(Into::into),
            candidate_run: None,
            candidate_id: None,
            verdict: None,
            by: "auto".into(),
            reason: None,
            at: chrono::DateTime::UNIX_EPOCH,
        }
    }

    use PromotionKind::{Promotion, Rollback as Back};

    #[test]
    fn the_previous_version_is_the_one_before_the_current() {
        let history = [
            event(Promotion, "1", None),
            event(Promotion, "2", Some("1")),
        ];
        assert_eq!(
            previous_production(&history, Some("2")).as_deref(),
            Some("1")
        );
        assert_eq!(production_lineage(&history), ["1", "2"]);
    }

    #[test]
    fn a_version_production_before_retrain_counts_as_previous() {
        // Production was 5 (set by hand) when retrain promoted 6.
        let history = [event(Promotion, "6", Some("5"))];
        assert_eq!(
            previous_production(&history, Some("6")).as_deref(),
            Some("5")
        );
        assert_eq!(production_lineage(&history), ["5", "6"]);
    }

    #[test]
    fn a_rollback_of_a_rollback_skips_the_version_rolled_back_from() {
        let history = [
            event(Promotion, "1", None),
            event(Promotion, "2", Some("1")),
            event(Promotion, "3", Some("2")),
            event(Back, "2", Some("3")),
        ];
        // Production is 2 again: 3 was rolled back from, so 1 is next.
        assert_eq!(
            previous_production(&history, Some("2")).as_deref(),
            Some("1")
        );
        let history = [
            event(Promotion, "1", None),
            event(Promotion, "2", Some("1")),
            event(Back, "1", Some("2")),
        ];
        assert_eq!(previous_production(&history, Some("1")), None);
    }

    #[test]
    fn nothing_to_roll_back_to_without_history_or_a_single_version() {
        assert_eq!(previous_production(&[], None), None);
        assert_eq!(
            previous_production(&[event(Promotion, "1", None)], Some("1")),
            None
        );
        // Production was removed by hand: the last one is the one to restore.
        assert_eq!(
            previous_production(&[event(Promotion, "1", None)], None).as_deref(),
            Some("1")
        );
    }
}
