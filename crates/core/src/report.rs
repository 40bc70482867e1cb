//! Reports: what a cycle did, per label. Rendered by the CLI (text, JSON,
//! GitHub summary), sent by notifiers and returned by the server.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{
    metrics_serde, Candidate, CycleId, DatasetCheckResult, FeedbackCounts, Label, Metrics,
    PromotedVersion, RunId, VersionTag,
};
use crate::gate::Verdict;
use crate::machine::{LabelRun, Outcome, Rollback, Stage};

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
    /// The label's last evaluated candidates, oldest first (at most
    /// [`HISTORY_LEN`]), filled from the run store before rendering
    /// (see [`with_history`]); drawn as a chart by [`LabelReport::to_markdown`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<MetricPoint>,
    /// A rollback run: what it restored, who asked and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Rollback>,
    /// What the label's `dataset_check` found, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_check: Option<DatasetCheckResult>,
    /// Older runs of this label awaiting approval that this cycle closed
    /// (`expired`, `superseded`): their manifests changed too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub closed_runs: Vec<RunId>,
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
    /// A rollback run moved production back to an earlier version.
    RolledBack,
    /// The `dataset_check` rejected the dataset version: nothing trained.
    DatasetRejected,
    /// Not approved within `approval_expires`: closed without promoting.
    Expired,
    /// A newer candidate of the label awaits approval: closed without promoting.
    Superseded,
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
            Self::RolledBack => "rolled_back",
            Self::DatasetRejected => "dataset_rejected",
            Self::Expired => "expired",
            Self::Superseded => "superseded",
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
            Some(Outcome::RolledBack { .. }) => LabelStatus::RolledBack,
            Some(Outcome::DatasetRejected { .. }) => LabelStatus::DatasetRejected,
            Some(Outcome::Expired { .. }) => LabelStatus::Expired,
            Some(Outcome::Superseded { .. }) => LabelStatus::Superseded,
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
            history: Vec::new(),
            rollback: run.rollback.as_deref().cloned(),
            dataset_check: run.dataset_check.as_deref().cloned(),
            closed_runs: Vec::new(),
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
            history: Vec::new(),
            rollback: None,
            dataset_check: None,
            closed_runs: Vec::new(),
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
    /// Whether a gate rejected a candidate or a dataset check a dataset.
    pub fn any_rejected(&self) -> bool {
        self.labels.iter().any(|l| {
            matches!(
                l.status,
                LabelStatus::Rejected | LabelStatus::DatasetRejected
            )
        })
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

    /// For a rollback run: "rolled back from X to Y by Z because R" (or
    /// what it is doing, while it has not finished).
    pub fn rollback_summary(&self) -> Option<String> {
        let rollback = self.rollback.as_ref()?;
        let to = self
            .promoted
            .as_ref()
            .map_or(rollback.to_version.as_str(), |p| p.version.as_str());
        let from = self
            .promoted
            .as_ref()
            .and_then(|p| p.previous.as_deref())
            .or(rollback.from_version.as_deref())
            .unwrap_or("none");
        let verb = if self.status == LabelStatus::RolledBack {
            "rolled back"
        } else {
            "rollback"
        };
        Some(format!(
            "{verb} from version {from} to version {to} by {} because {}{}",
            rollback.by,
            rollback.reason,
            if rollback.forced {
                " (forced: the version never was production for this label)"
            } else {
                ""
            }
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
        if let Some(summary) = self.rollback_summary() {
            out.push_str(&format!("- {summary}\n"));
        } else if let Some(promoted) = &self.promoted {
            out.push_str(&format!("- promoted version: `{}`", promoted.version));
            if let Some(previous) = &promoted.previous {
                out.push_str(&format!(" (previous `{previous}` archived)"));
            }
            out.push('\n');
        }
        for lost in &self.lost_attempts {
            out.push_str(&format!("- lost attempt: {lost}\n"));
        }
        match &self.outcome {
            Some(Outcome::Expired { reason }) => out.push_str(&format!("- expired: {reason}\n")),
            Some(Outcome::DatasetRejected { version, .. }) => out.push_str(&format!(
                "- dataset version `{version}` rejected by the dataset check: nothing was leased or trained, and it will not be checked again\n"
            )),
            Some(Outcome::Superseded { by_run }) => out.push_str(&format!(
                "- superseded by run `{by_run}` (a newer candidate awaiting approval)\n"
            )),
            Some(Outcome::Rejected { reason }) if self.verdict.as_ref().is_none_or(|v| v.passed) => {
                out.push_str(&format!("- rejected: {reason}\n"))
            }
            _ => {}
        }
        if let Some(error) = &self.error {
            out.push_str(&format!("- error: {error}\n"));
        }
        if let Some(check) = &self.dataset_check {
            out.push_str(&check_markdown(check));
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
        out.push_str(&self.history_charts());
        out
    }
}

/// The dataset check's section of a report: verdict, summary, the check's
/// own markdown report and, when it failed, how it ended (output tail).
fn check_markdown(check: &DatasetCheckResult) -> String {
    let mut out = format!(
        "\n**Dataset check:** {}\n\n",
        if check.passed {
            "passed ✅"
        } else {
            "rejected ❌"
        }
    );
    if !check.summary.is_empty() {
        out.push_str("| summary | value |\n|---|---|\n");
        for (key, value) in &check.summary {
            let value = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!(
                "| {} | {} |\n",
                key.replace('|', "\\|"),
                value.replace('|', "\\|")
            ));
        }
        out.push('\n');
    }
    if let Some(report) = check.report_md.as_deref().filter(|r| !r.trim().is_empty()) {
        out.push_str(report.trim_end());
        out.push_str("\n\n");
    }
    if let Some(detail) = &check.detail {
        // Output of user code: fenced so it cannot break the markdown.
        let fence = "~~~~";
        out.push_str(&format!(
            "{fence}text\n{}\n{fence}\n\n",
            detail.replace(fence, "~~~")
        ));
    }
    out
}

/// How many evaluated candidates the report's chart shows.
pub const HISTORY_LEN: usize = 20;

/// One evaluated candidate of a label: a row of `retrain metrics` and a
/// point of the report's chart (seed 004's `metrics/{task}.csv`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub run_id: RunId,
    /// When the run started.
    pub at: DateTime<Utc>,
    #[serde(default)]
    pub dataset_version: Option<VersionTag>,
    pub candidate: String,
    #[serde(default, with = "metrics_serde")]
    pub metrics: Metrics,
    /// The production model the candidate was compared with, if any.
    #[serde(default)]
    pub production_version: Option<String>,
    #[serde(default, with = "metrics_serde")]
    pub production: Metrics,
    /// `passed`, `rejected` or `forced`.
    pub verdict: String,
    pub promoted: bool,
}

impl MetricPoint {
    /// The point of an evaluated run (`None` before the gate ran).
    pub fn from_run(run: &LabelRun, at: DateTime<Utc>) -> Option<Self> {
        let verdict = run.verdict.as_ref()?;
        let candidate = run.candidate.as_ref()?;
        Some(Self {
            run_id: run.run_id.clone(),
            at,
            dataset_version: run.dataset.as_ref().map(|d| d.metadata.version_tag.clone()),
            candidate: candidate.id.clone(),
            metrics: candidate.metrics.clone(),
            production_version: run.baseline.as_ref().map(|b| b.version.clone()),
            production: run
                .baseline
                .as_ref()
                .map(|b| b.metrics.clone())
                .unwrap_or_default(),
            verdict: if verdict.forced {
                "forced"
            } else if verdict.passed {
                "passed"
            } else {
                "rejected"
            }
            .into(),
            promoted: run.promoted.is_some(),
        })
    }
}

/// Whether a run with this short outcome (`RunSummary::outcome`) can have
/// been evaluated by the gate (skipped and planned runs never are).
pub fn may_be_evaluated(outcome: &str) -> bool {
    !matches!(outcome, "skipped" | "planned" | "trained")
}

/// `report` with the last [`HISTORY_LEN`] of `points` (sorted oldest first).
pub fn with_history(mut report: LabelReport, mut points: Vec<MetricPoint>) -> LabelReport {
    points.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.run_id.0.cmp(&b.run_id.0)));
    let skip = points.len().saturating_sub(HISTORY_LEN);
    report.history = points.into_iter().skip(skip).collect();
    report
}

fn csv_field(raw: &str) -> String {
    if raw.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", raw.replace('"', "\"\""))
    } else {
        raw.to_owned()
    }
}

fn csv_number(value: Option<f64>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// `retrain metrics --format csv`: one row per point, in the given order;
/// one column per metric any candidate reported and its production value.
pub fn metrics_csv(points: &[MetricPoint]) -> String {
    let names: std::collections::BTreeSet<&String> =
        points.iter().flat_map(|p| p.metrics.keys()).collect();
    let mut out = String::from("time,run_id,dataset_version,candidate");
    for name in &names {
        out.push_str(&format!(
            ",{},{}",
            csv_field(name),
            csv_field(&format!("production_{name}"))
        ));
    }
    out.push_str(",production_version,verdict,promoted\n");
    for p in points {
        out.push_str(&format!(
            "{},{},{},{}",
            p.at.to_rfc3339(),
            csv_field(p.run_id.as_str()),
            csv_field(p.dataset_version.as_ref().map_or("", |v| v.0.as_str())),
            csv_field(&p.candidate)
        ));
        for name in &names {
            out.push_str(&format!(
                ",{},{}",
                csv_number(p.metrics.get(*name).copied()),
                csv_number(p.production.get(*name).copied())
            ));
        }
        out.push_str(&format!(
            ",{},{},{}\n",
            csv_field(p.production_version.as_deref().unwrap_or("")),
            p.verdict,
            p.promoted
        ));
    }
    out
}

/// A series for the chart: missing or non-finite values take the previous
/// value (leading ones the first known value); `None` if nothing is known.
fn filled(values: &[Option<f64>]) -> Option<Vec<f64>> {
    let first = values.iter().flatten().copied().find(|v| v.is_finite())?;
    let mut last = first;
    Some(
        values
            .iter()
            .map(|v| {
                if let Some(v) = v.filter(|v| v.is_finite()) {
                    last = v;
                }
                last
            })
            .collect(),
    )
}

fn mermaid_text(raw: &str) -> String {
    raw.replace(['"', '\n', '\r'], "'")
}

fn mermaid_numbers(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl LabelReport {
    /// One Mermaid `xychart-beta` per gated metric over [`Self::history`]:
    /// the candidate's line, then production's. Empty without a gate
    /// verdict or history.
    pub fn history_charts(&self) -> String {
        let Some(verdict) = &self.verdict else {
            return String::new();
        };
        if self.history.is_empty() || verdict.comparisons.is_empty() {
            return String::new();
        }
        let axis: Vec<String> = self
            .history
            .iter()
            .map(|p| {
                let name = match &p.dataset_version {
                    Some(v) => v.0.clone(),
                    None => p.candidate.chars().take(12).collect(),
                };
                format!("\"{}\"", mermaid_text(&name))
            })
            .collect();
        let mut out = String::new();
        for comparison in &verdict.comparisons {
            let metric = &comparison.metric;
            let candidate: Vec<Option<f64>> = self
                .history
                .iter()
                .map(|p| p.metrics.get(metric).copied())
                .collect();
            let Some(candidate) = filled(&candidate) else {
                continue;
            };
            let production: Vec<Option<f64>> = self
                .history
                .iter()
                .map(|p| p.production.get(metric).copied())
                .collect();
            let production = filled(&production);
            let all = candidate.iter().chain(production.iter().flatten());
            let (min, max) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(*v), hi.max(*v))
            });
            let pad = if max > min { (max - min) * 0.1 } else { 0.01 };
            let direction = match comparison.direction {
                crate::gate::Direction::Higher => "higher is better",
                crate::gate::Direction::Lower => "lower is better",
            };
            out.push_str(&format!(
                "\n**{}** over the last {} candidates: first line candidate{}\n\n",
                mermaid_text(metric),
                self.history.len(),
                if production.is_some() {
                    ", second line production"
                } else {
                    " (no production model yet)"
                }
            ));
            out.push_str("```mermaid\nxychart-beta\n");
            out.push_str(&format!(
                "    title \"{} ({direction})\"\n",
                mermaid_text(metric)
            ));
            out.push_str(&format!("    x-axis [{}]\n", axis.join(", ")));
            out.push_str(&format!(
                "    y-axis \"{}\" {:.4} --> {:.4}\n",
                mermaid_text(metric),
                min - pad,
                max + pad
            ));
            out.push_str(&format!("    line [{}]\n", mermaid_numbers(&candidate)));
            if let Some(production) = &production {
                out.push_str(&format!("    line [{}]\n", mermaid_numbers(production)));
            }
            out.push_str("```\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::{Comparison, Direction};

    fn point(n: u32, accuracy: f64, production: Option<f64>, promoted: bool) -> MetricPoint {
        MetricPoint {
            run_id: RunId(format!("run-{n}")),
            at: DateTime::from_timestamp(1_700_000_000 + i64::from(n) * 60, 0).unwrap(),
            dataset_version: Some(VersionTag::new(format!("v{n}"))),
            candidate: format!("cand-{n}"),
            metrics: [("accuracy".to_owned(), accuracy), ("loss".to_owned(), 1.0)].into(),
            production_version: production.map(|_| "1".to_owned()),
            production: production
                .map(|p| [("accuracy".to_owned(), p)].into())
                .unwrap_or_default(),
            verdict: if promoted { "passed" } else { "rejected" }.into(),
            promoted,
        }
    }

    fn gated_report() -> LabelReport {
        let mut report = LabelReport::without_run(
            Label::new("department").unwrap(),
            40,
            LabelStatus::Promoted,
            "x".into(),
        );
        report.error = None;
        report.verdict = Some(Verdict {
            passed: true,
            first_model: false,
            forced: false,
            comparisons: vec![Comparison {
                metric: "accuracy".into(),
                direction: Direction::Higher,
                candidate: Some(0.9),
                baseline: Some(0.8),
                delta: Some(0.1),
                passed: true,
                reason: "better".into(),
            }],
            reason: "all metrics improved".into(),
        });
        report
    }

    #[test]
    fn chart_renders_each_gated_metric_in_order_with_production() {
        // Given out of order: the chart is oldest first.
        let points = vec![
            point(3, 0.9, Some(0.8), true),
            point(1, 0.7, None, true),
            point(2, 0.8, Some(0.7), true),
        ];
        let report = with_history(gated_report(), points);
        let charts = report.history_charts();
        assert_eq!(
            charts,
            "\n**accuracy** over the last 3 candidates: first line candidate, second line production\n\n\
             ```mermaid\n\
             xychart-beta\n    \
             title \"accuracy (higher is better)\"\n    \
             x-axis [\"v1\", \"v2\", \"v3\"]\n    \
             y-axis \"accuracy\" 0.6800 --> 0.9200\n    \
             line [0.7000, 0.8000, 0.9000]\n    \
             line [0.7000, 0.7000, 0.8000]\n\
             ```\n"
        );
        // Only the gated metric is drawn (not `loss`), inside the markdown.
        let markdown = report.to_markdown();
        assert!(markdown.ends_with(&charts), "{markdown}");
        assert_eq!(markdown.matches("xychart-beta").count(), 1);
    }

    #[test]
    fn chart_keeps_the_last_twenty_candidates() {
        let points = (0..25).map(|n| point(n, 0.5, Some(0.5), false)).collect();
        let report = with_history(gated_report(), points);
        assert_eq!(report.history.len(), HISTORY_LEN);
        assert_eq!(report.history[0].run_id.0, "run-5");
        assert!(report.history_charts().contains("\"v24\"]"));
    }

    #[test]
    fn chart_is_omitted_without_a_gate_or_history() {
        let mut ungated = with_history(gated_report(), vec![point(1, 0.7, None, true)]);
        ungated.verdict = None;
        assert_eq!(ungated.history_charts(), "");
        assert!(!ungated.to_markdown().contains("mermaid"));
        let empty = gated_report();
        assert!(!empty.to_markdown().contains("mermaid"));
    }

    #[test]
    fn metrics_csv_has_one_row_per_candidate_with_production_columns() {
        let csv = metrics_csv(&[point(1, 0.7, None, true), point(2, 0.8, Some(0.7), false)]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "time,run_id,dataset_version,candidate,accuracy,production_accuracy,loss,production_loss,production_version,verdict,promoted"
        );
        assert_eq!(
            lines[1],
            "2023-11-14T22:14:20+00:00,run-1,v1,cand-1,0.7,,1,,,passed,true"
        );
        assert_eq!(
            lines[2],
            "2023-11-14T22:15:20+00:00,run-2,v2,cand-2,0.8,0.7,1,,1,rejected,false"
        );
        assert_eq!(lines.len(), 3);
    }
}
