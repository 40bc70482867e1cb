//! The run manifest document (seed 004, §9): what a run was built from and
//! what it produced, composed from its journal snapshot. Shown by `retrain
//! runs show ID --format json|md` and written to
//! `state_dir/runs/<run_id>/manifest.json`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{Candidate, CycleId, Label, ProductionModel, PromotedVersion, RunId};
use crate::gate::Verdict;
use crate::machine::{LabelRun, RunManifest, Stage};

/// The dataset a run consumed, with the SHA-256 of its metadata document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetRecord {
    pub name: String,
    pub version: String,
    pub num_samples: u64,
    /// SHA-256 of the canonical metadata document (`DatasetMetadata::content_hash`).
    pub metadata_sha256: String,
    /// The store's change marker (`ETag`, commit, mtime), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

/// What the dataset check found (its verdict and summary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetCheckRecord {
    pub passed: bool,
    pub summary: serde_json::Map<String, serde_json::Value>,
}

/// One run's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestDocument {
    pub run_id: RunId,
    pub cycle_id: CycleId,
    pub label: Label,
    pub started_at: Option<DateTime<Utc>>,
    pub stage: Stage,
    /// Short outcome (`promoted`, `rejected`…), `None` while running.
    pub outcome: Option<String>,
    /// Config hash, binary version, git sha, rustc, OS, trainer.
    pub environment: RunManifest,
    pub dataset: Option<DatasetRecord>,
    /// The `dataset_check`'s verdict and summary, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_check: Option<DatasetCheckRecord>,
    /// The candidate id with its metrics.
    pub candidate: Option<Candidate>,
    /// The production model compared against, with its metrics.
    pub baseline: Option<ProductionModel>,
    pub verdict: Option<Verdict>,
    pub promoted: Option<PromotedVersion>,
    /// Training jobs lost (counted attempts).
    pub lost_attempts: Vec<String>,
}

impl ManifestDocument {
    pub fn from_run(run: &LabelRun) -> Self {
        Self {
            run_id: run.run_id.clone(),
            cycle_id: run.cycle_id.clone(),
            label: run.label().clone(),
            started_at: run.started_at,
            stage: run.stage,
            outcome: run.outcome.as_ref().map(|o| o.short().to_owned()),
            environment: run.manifest.clone(),
            dataset: run.dataset.as_ref().map(|d| DatasetRecord {
                name: d.metadata.dataset_name.clone(),
                version: d.metadata.version_tag.0.clone(),
                num_samples: d.metadata.num_samples,
                metadata_sha256: d.metadata.content_hash(),
                revision: d.revision.clone(),
            }),
            dataset_check: run.dataset_check.as_ref().map(|c| DatasetCheckRecord {
                passed: c.passed,
                summary: c.summary.clone(),
            }),
            candidate: run.candidate.clone(),
            baseline: run.baseline.as_deref().cloned(),
            verdict: run.verdict.clone(),
            promoted: run.promoted.clone(),
            lost_attempts: run.lost_attempts.clone(),
        }
    }

    /// Markdown for `retrain runs show --format md`.
    pub fn to_markdown(&self) -> String {
        let env = &self.environment;
        let or_unknown = |s: &str| {
            if s.is_empty() {
                "unknown".to_owned()
            } else {
                s.to_owned()
            }
        };
        let mut out = String::from("## Manifest\n\n");
        out.push_str(&format!(
            "- binary version: `{}`\n",
            or_unknown(&env.binary_version)
        ));
        out.push_str(&format!("- git sha: `{}`\n", or_unknown(&env.git_sha)));
        out.push_str(&format!("- rustc: `{}`\n", or_unknown(&env.rustc_version)));
        out.push_str(&format!("- os: `{}`\n", or_unknown(&env.os)));
        out.push_str(&format!(
            "- config hash: `{}`\n",
            or_unknown(&env.config_hash)
        ));
        if let Some(trainer) = &env.trainer {
            out.push_str(&format!("- trainer: `{trainer}`"));
            if let Some(exit) = &env.trainer_exit {
                out.push_str(&format!(" ({exit})"));
            }
            out.push('\n');
        }
        if let Some(by) = &env.triggered_by {
            out.push_str(&format!("- triggered by: `{by}`\n"));
        }
        if let Some(d) = &self.dataset {
            out.push_str(&format!(
                "- dataset: `{}` `{}` ({} samples, metadata sha256 `{}`)\n",
                d.name, d.version, d.num_samples, d.metadata_sha256
            ));
        }
        if let Some(check) = &self.dataset_check {
            out.push_str(&format!(
                "- dataset check: {}{}\n",
                if check.passed { "passed" } else { "rejected" },
                if check.summary.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (summary `{}`)",
                        serde_json::Value::Object(check.summary.clone())
                    )
                }
            ));
        }
        let metrics = |m: &crate::domain::Metrics| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(c) = &self.candidate {
            out.push_str(&format!(
                "- candidate: `{}` ({})\n",
                c.id,
                metrics(&c.metrics)
            ));
        }
        if let Some(b) = &self.baseline {
            out.push_str(&format!(
                "- baseline: version `{}` ({})\n",
                b.version,
                metrics(&b.metrics)
            ));
        }
        if let Some(v) = &self.verdict {
            out.push_str(&format!(
                "- verdict: {}{} — {}\n",
                if v.passed { "passed" } else { "rejected" },
                if v.forced { " (forced)" } else { "" },
                v.reason
            ));
        }
        if let Some(p) = &self.promoted {
            out.push_str(&format!("- promoted: version `{}`", p.version));
            if let Some(previous) = &p.previous {
                out.push_str(&format!(" (previous `{previous}`)"));
            }
            out.push('\n');
        }
        out
    }
}

/// The Markdown document of one run (`retrain runs show --format md`,
/// `GET /v1/runs/{id}/report.md`): its report (with the history chart if
/// `report` has one), its manifest and its journal.
pub fn run_markdown(
    detail: &crate::journal::RunDetail,
    report: &crate::report::LabelReport,
) -> String {
    let mut out = format!("# retrain run `{}`\n\n", detail.summary.run_id);
    out.push_str(&report.to_markdown());
    out.push_str("\n\n");
    out.push_str(&ManifestDocument::from_run(&detail.snapshot).to_markdown());
    out.push_str("\n## Journal\n\n| seq | at | from | to | event |\n|---|---|---|---|---|\n");
    for t in &detail.transitions {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            t.seq,
            t.at.to_rfc3339(),
            t.from,
            t.to,
            t.event.get("event").and_then(|e| e.as_str()).unwrap_or("?")
        ));
    }
    out
}
