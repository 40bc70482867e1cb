//! Reports: what a cycle did, per label. Rendered by the CLI (text, JSON,
//! GitHub summary), sent by notifiers and returned by the server.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{
    Candidate, CycleId, FeedbackCounts, Label, PromotedVersion, RunId, VersionTag,
};
use crate::gate::Verdict;
use crate::machine::{LabelRun, Outcome, Stage};

/// The per-label result of a cycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelReport {
    pub label: Label,
    pub run_id: Option<RunId>,
    pub status: LabelStatus,
    pub stage: Option<Stage>,
    pub outcome: Option<Outcome>,
    pub counts: Option<FeedbackCounts>,
    pub measured: Option<u64>,
    pub threshold: u64,
    pub dataset_version: Option<VersionTag>,
    pub dataset_samples: Option<u64>,
    pub candidate: Option<Candidate>,
    pub verdict: Option<Verdict>,
    pub promoted: Option<PromotedVersion>,
    pub lost_attempts: Vec<String>,
    pub resumed: bool,
    pub error: Option<String>,
}

/// Coarse status per label, the first thing a reader looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelStatus {
    Skipped,
    Planned,
    Trained,
    Promoted,
    Passed,
    /// Gate passed; waiting for `retrain approve` (`promote = "manual"`).
    AwaitingApproval,
    Rejected,
    Failed,
    /// Another orchestrator holds the label's lock.
    Busy,
    /// Stopped by Ctrl-C/SIGTERM; the journal allows a resume.
    Interrupted,
    /// A step failed transiently (registry, notifier, lease outage); the
    /// run resumes at that step at the next cycle.
    Deferred,
    /// The label's lock was lost mid-run (expired and taken over): this
    /// orchestrator stopped without acting further; the new holder resumes.
    LockLost,
}

impl LabelStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skipped => "skipped",
            Self::Planned => "planned",
            Self::Trained => "trained",
            Self::Promoted => "promoted",
            Self::Passed => "passed",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::Busy => "busy",
            Self::Interrupted => "interrupted",
            Self::Deferred => "deferred",
            Self::LockLost => "lock_lost",
        }
    }
}

impl LabelReport {
    pub fn from_run(run: &LabelRun, resumed: bool) -> Self {
        let status = match &run.outcome {
            Some(Outcome::Skipped { .. }) => LabelStatus::Skipped,
            Some(Outcome::Planned { .. }) => LabelStatus::Planned,
            Some(Outcome::Trained { .. }) => LabelStatus::Trained,
            Some(Outcome::Promoted { .. }) => LabelStatus::Promoted,
            Some(Outcome::Passed) => LabelStatus::Passed,
            Some(Outcome::AwaitingApproval) => LabelStatus::AwaitingApproval,
            Some(Outcome::Rejected { .. }) => LabelStatus::Rejected,
            Some(Outcome::Failed { .. }) => LabelStatus::Failed,
            None => LabelStatus::Interrupted,
        };
        let error = match &run.outcome {
            Some(Outcome::Failed { stage, reason }) => Some(format!("{stage}: {reason}")),
            _ => None,
        };
        Self {
            label: run.label().clone(),
            run_id: Some(run.run_id.clone()),
            status,
            stage: Some(run.stage),
            outcome: run.outcome.clone(),
            counts: run.counts,
            measured: run.measured,
            threshold: run.plan.trigger.threshold(),
            dataset_version: run.dataset.as_ref().map(|d| d.metadata.version_tag.clone()),
            dataset_samples: run.dataset.as_ref().map(|d| d.metadata.num_samples),
            candidate: run.candidate.clone(),
            verdict: run.verdict.clone(),
            promoted: run.promoted.clone(),
            lost_attempts: run.lost_attempts.clone(),
            resumed,
            error,
        }
    }

    /// A label that never got a run: `status` and why.
    fn without_run(label: Label, threshold: u64, status: LabelStatus, error: String) -> Self {
        Self {
            label,
            run_id: None,
            status,
            stage: None,
            outcome: None,
            counts: None,
            measured: None,
            threshold,
            dataset_version: None,
            dataset_samples: None,
            candidate: None,
            verdict: None,
            promoted: None,
            lost_attempts: Vec::new(),
            resumed: false,
            error: Some(error),
        }
    }

    pub fn busy(label: Label, threshold: u64, holder: String) -> Self {
        Self::without_run(
            label,
            threshold,
            LabelStatus::Busy,
            format!("label is locked by {holder}"),
        )
    }

    pub fn failed_before_run(label: Label, threshold: u64, error: String) -> Self {
        Self::without_run(label, threshold, LabelStatus::Failed, error)
    }

    pub fn interrupted_before_run(label: Label, threshold: u64) -> Self {
        Self::without_run(
            label,
            threshold,
            LabelStatus::Interrupted,
            "interrupted before start".into(),
        )
    }

    /// Whether the model improved (gate passed and promoted, or first model).
    pub fn improved(&self) -> bool {
        self.status == LabelStatus::Promoted
    }

    /// Whether the label crossed its threshold (or would have, in a plan).
    pub fn triggered(&self) -> bool {
        !matches!(self.status, LabelStatus::Skipped | LabelStatus::Busy)
    }
}

/// Everything one cycle did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CycleReport {
    pub cycle_id: CycleId,
    pub dry_run: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub interrupted: bool,
    pub labels: Vec<LabelReport>,
}

impl CycleReport {
    /// Whether a label did not complete its run: failed, deferred to the
    /// next cycle by an outage, or stopped because its lock was lost.
    pub fn any_failed(&self) -> bool {
        self.labels.iter().any(|l| {
            matches!(
                l.status,
                LabelStatus::Failed | LabelStatus::Deferred | LabelStatus::LockLost
            )
        })
    }
    pub fn any_rejected(&self) -> bool {
        self.labels
            .iter()
            .any(|l| l.status == LabelStatus::Rejected)
    }
}

fn fmt_metric(value: Option<f64>) -> String {
    match value {
        Some(v) => format!("{v:.4}"),
        None => "—".into(),
    }
}

impl LabelReport {
    /// Markdown rendering shared by the GitHub notifier, the Actions step
    /// summary and `retrain runs show --format md`.
    /// For a run awaiting approval: the exact commands that decide it.
    pub fn approval_hint(&self) -> Option<String> {
        if self.status != LabelStatus::AwaitingApproval {
            return None;
        }
        let run_id = self.run_id.as_ref()?;
        Some(format!(
            "awaiting approval: `retrain approve {run_id} --reason \"...\"` to promote, `retrain reject {run_id} --reason \"...\"` to close"
        ))
    }

    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "### `{}`: {}\n\n",
            self.label,
            self.status.as_str()
        ));
        if let Some(run_id) = &self.run_id {
            out.push_str(&format!("- run: `{run_id}`\n"));
            if let Some(how) = self.approval_hint() {
                out.push_str(&format!("- {how}\n"));
            }
        }
        if let Some(measured) = self.measured {
            out.push_str(&format!(
                "- measured: {measured} (threshold {})\n",
                self.threshold
            ));
        }
        if let Some(version) = &self.dataset_version {
            out.push_str(&format!(
                "- dataset: `{version}` ({} samples)\n",
                self.dataset_samples.unwrap_or_default()
            ));
        }
        if let Some(candidate) = &self.candidate {
            if !candidate.id.is_empty() {
                out.push_str(&format!("- candidate: `{}`\n", candidate.id));
            }
        }
        if let Some(promoted) = &self.promoted {
            out.push_str(&format!("- promoted version: `{}`", promoted.version));
            if let Some(previous) = &promoted.previous {
                out.push_str(&format!(" (previous `{previous}` archived)"));
            }
            out.push('\n');
        }
        for lost in &self.lost_attempts {
            out.push_str(&format!("- lost attempt: {lost}\n"));
        }
        if let Some(error) = &self.error {
            out.push_str(&format!("- error: {error}\n"));
        }
        if let Some(verdict) = &self.verdict {
            out.push_str(&format!(
                "\n**Gate:** {}{}\n\n",
                verdict.reason,
                if verdict.forced { " (forced)" } else { "" }
            ));
            out.push_str(
                "| metric | candidate | production | delta | pass |\n|---|---|---|---|---|\n",
            );
            for c in &verdict.comparisons {
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {} |\n",
                    c.metric,
                    fmt_metric(c.candidate),
                    fmt_metric(c.baseline),
                    c.delta
                        .map(|d| format!("{d:+.4}"))
                        .unwrap_or_else(|| "—".into()),
                    if c.passed { "✅" } else { "❌" }
                ));
            }
        }
        out
    }
}
