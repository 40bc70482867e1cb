//! Rendering: human text, JSON, and the GitHub Actions extras (groups,
//! annotations, `$GITHUB_OUTPUT`, `$GITHUB_STEP_SUMMARY`).

use std::io::Write;

use anyhow::Context;
use retrain_adapters::store::{RemoteJob, ResourceRequest};
use retrain_core::gate::Verdict;
use retrain_core::machine::Outcome;
use retrain_core::report::{CycleReport, LabelReport, LabelStatus};

pub fn detail(report: &LabelReport) -> String {
    // A run that stopped before its end says why, whatever outcome it had.
    if matches!(report.status, LabelStatus::Deferred | LabelStatus::LockLost) {
        if let Some(error) = &report.error {
            return error.clone();
        }
    }
    match &report.outcome {
        Some(Outcome::Skipped { reason, .. }) => reason.clone(),
        Some(Outcome::Planned { would, .. }) => format!("would {would}"),
        Some(Outcome::Trained { candidate }) => match candidate {
            Some(c) => format!("trained {c} (gate = none)"),
            None => "training started (gate = none)".into(),
        },
        Some(Outcome::Promoted { version }) => format!(
            "promoted version {version}; {}",
            report
                .verdict
                .as_ref()
                .map(|v| v.reason.as_str())
                .unwrap_or("")
        ),
        Some(Outcome::Passed) => "gate passed; promotion disabled".into(),
        Some(Outcome::AwaitingApproval) => report
            .approval_hint()
            .map(|h| h.replace('`', ""))
            .unwrap_or_else(|| "awaiting approval".into()),
        Some(Outcome::Rejected { reason }) => reason.clone(),
        Some(Outcome::RolledBack { from, to }) => report.rollback_summary().unwrap_or_else(|| {
            format!(
                "rolled back from version {} to version {to}",
                from.as_deref().unwrap_or("none")
            )
        }),
        Some(Outcome::DatasetRejected { reason, .. }) => {
            // The detail line is one line; the full report is in the markdown.
            let first = reason.lines().next().unwrap_or_default();
            format!("{first} (nothing leased or trained; this version is not checked again)")
        }
        Some(Outcome::Expired { reason }) => format!("expired: {reason}"),
        Some(Outcome::Superseded { by_run }) => {
            format!("superseded by run {by_run} (a newer candidate awaiting approval)")
        }
        Some(Outcome::Failed { .. }) | None => report.error.clone().unwrap_or_default(),
    }
}

pub fn print_cycle_text(report: &CycleReport) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "retrain {} {}{}",
        if report.dry_run { "plan" } else { "run" },
        report.cycle_id,
        if report.interrupted {
            " (interrupted: state saved, rerun to resume)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "{:<16} {:<12} {:>18}  {:<22} DETAIL",
        "LABEL", "STATUS", "MEASURED/THRESHOLD", "DATASET"
    );
    for label in &report.labels {
        let measured = match label.measured {
            Some(m) => format!("{m}/{}", label.threshold),
            None => format!("-/{}", label.threshold),
        };
        let dataset = label
            .dataset_version
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<16} {:<12} {:>18}  {:<22} {}",
            label.label.as_str(),
            label.status.as_str(),
            measured,
            dataset,
            detail(label)
        );
        if let Some(verdict) = &label.verdict {
            print_verdict(&mut out, verdict);
        }
        if let Some(counts) = &label.counts {
            let _ = writeln!(
                out,
                "{:<16} counts: misclassified={} correct={}",
                "", counts.misclassified, counts.correct
            );
        }
    }
}

pub fn print_verdict(out: &mut impl Write, verdict: &Verdict) {
    let _ = writeln!(
        out,
        "    gate: {}{}",
        verdict.reason,
        if verdict.forced { " [FORCED]" } else { "" }
    );
    for c in &verdict.comparisons {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "      {:<12} candidate={:<8} production={:<8} delta={:<9} {}",
            c.metric,
            f(c.candidate),
            f(c.baseline),
            c.delta
                .map(|d| format!("{d:+.4}"))
                .unwrap_or_else(|| "-".into()),
            if c.passed { "pass" } else { "FAIL" }
        );
    }
}

/// `retrain history`: one line per production change, oldest first.
pub fn history_lines(events: &[retrain_core::journal::PromotionEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let mut line = format!(
                "{}  {:<9} version {} (was {})  by {}",
                e.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                e.kind.as_str(),
                e.version,
                e.previous_version.as_deref().unwrap_or("none"),
                e.by,
            );
            if let Some(reason) = &e.reason {
                line.push_str(&format!(": {reason}"));
            }
            if let Some(candidate) = &e.candidate_id {
                line.push_str(&format!("  candidate {candidate}"));
            }
            if let Some(verdict) = &e.verdict {
                line.push_str(&format!("  [gate: {verdict}]"));
            }
            line.push_str(&format!("  run {}", e.run_id));
            line
        })
        .collect()
}

pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("rendering JSON")?;
    println!("{text}");
    Ok(())
}

pub fn in_github_actions() -> bool {
    std::env::var("GITHUB_ACTIONS")
        .map(|v| v == "true")
        .unwrap_or(false)
}

/// Escape data for workflow commands (`%`, CR, LF).
fn escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn append(path_var: &str, content: &str) -> anyhow::Result<()> {
    let Ok(path) = std::env::var(path_var) else {
        return Ok(());
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening ${path_var} ({path})"))?;
    file.write_all(content.as_bytes())
        .with_context(|| format!("writing ${path_var}"))
}

fn output_key(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Groups, annotations, step outputs and the step summary.
pub fn github_actions(report: &CycleReport) -> anyhow::Result<()> {
    for label in &report.labels {
        println!(
            "::group::retrain {} — {}",
            label.label,
            label.status.as_str()
        );
        println!("{}", label.to_markdown());
        println!("::endgroup::");
        let message = escape_data(&format!("{}: {}", label.label, detail(label)));
        match label.status {
            LabelStatus::Failed | LabelStatus::LockLost => {
                println!("::error title=retrain {}::{message}", label.label)
            }
            LabelStatus::Rejected
            | LabelStatus::Busy
            | LabelStatus::Interrupted
            | LabelStatus::Deferred => {
                println!("::warning title=retrain {}::{message}", label.label)
            }
            _ => {}
        }
    }

    let mut outputs = String::new();
    let triggered = report.labels.iter().any(LabelReport::triggered);
    let improved = report.labels.iter().any(LabelReport::improved);
    outputs.push_str(&format!("run_id={}\n", report.cycle_id));
    outputs.push_str(&format!("triggered={triggered}\n"));
    outputs.push_str(&format!("improved={improved}\n"));
    let awaiting = report
        .labels
        .iter()
        .any(|l| l.status == LabelStatus::AwaitingApproval);
    outputs.push_str(&format!("awaiting_approval={awaiting}\n"));
    for label in &report.labels {
        let key = output_key(label.label.as_str());
        outputs.push_str(&format!("{key}_status={}\n", label.status.as_str()));
        outputs.push_str(&format!("{key}_improved={}\n", label.improved()));
        if let Some(run_id) = &label.run_id {
            outputs.push_str(&format!("{key}_run_id={run_id}\n"));
        }
        if let Some(candidate) = &label.candidate {
            for (metric, value) in &candidate.metrics {
                outputs.push_str(&format!("{key}_{}={value}\n", output_key(metric)));
            }
        }
    }
    append("GITHUB_OUTPUT", &outputs)?;

    let mut summary = String::from("## retrain\n\n| label | status | measured / threshold | dataset | detail |\n|---|---|---|---|---|\n");
    for label in &report.labels {
        summary.push_str(&format!(
            "| `{}` | {} | {} / {} | {} | {} |\n",
            label.label,
            label.status.as_str(),
            label
                .measured
                .map(|m| m.to_string())
                .unwrap_or_else(|| "-".into()),
            label.threshold,
            label
                .dataset_version
                .as_ref()
                .map(|v| format!("`{v}`"))
                .unwrap_or_else(|| "-".into()),
            detail(label).replace('|', "\\|")
        ));
    }
    for label in report.labels.iter().filter(|l| l.verdict.is_some()) {
        summary.push('\n');
        summary.push_str(&label.to_markdown());
    }
    append("GITHUB_STEP_SUMMARY", &summary)
}

/// Step outputs for `retrain gate`.
pub fn github_gate_outputs(
    verdict: &Verdict,
    baseline_version: Option<&str>,
) -> anyhow::Result<()> {
    let mut outputs = format!("improved={}\nforced={}\n", verdict.passed, verdict.forced);
    outputs.push_str(&format!(
        "baseline={}\n",
        baseline_version.unwrap_or("none")
    ));
    for c in &verdict.comparisons {
        let key = output_key(&c.metric);
        if let Some(v) = c.candidate {
            outputs.push_str(&format!("{key}={v}\n"));
        }
        if let Some(v) = c.baseline {
            outputs.push_str(&format!("baseline_{key}={v}\n"));
        }
    }
    append("GITHUB_OUTPUT", &outputs)
}

/// A queued or held remote job as `retrain status` shows it. `waiting_secs`
/// is the queue age: until now while queued, until its assignment once held
/// (as `GET /v1/workers/queue` counts it).
pub fn remote_job_json(job: &RemoteJob, now: chrono::DateTime<chrono::Utc>) -> serde_json::Value {
    let waited_until = job.assigned_at.unwrap_or(now);
    serde_json::json!({
        "job_key": job.job_key,
        "run_id": job.run_id,
        "state": job.state,
        "attempt": job.attempt,
        "worker_id": job.worker_id,
        "enqueued_at": job.enqueued_at,
        "assigned_at": job.assigned_at,
        "waiting_secs": (waited_until - job.enqueued_at).num_seconds().max(0),
        "request": job.spec.request,
    })
}

/// A table cell: a JSON value as text, `-` for null, a string unquoted.
pub fn json_cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A table cell of any serialisable value, written as its JSON form would
/// be read (`json_cell`): a time as `--output json` shows it.
pub fn cell<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_value(value).map_or_else(|_| "-".to_owned(), |v| json_cell(&v))
}

/// The second table of `retrain status`: every label's remote jobs (each
/// label's `remote_jobs` JSON), or `None` when no label has one, so that
/// the output without workers is the one table it always was.
pub fn remote_jobs_table<'a>(
    labels: impl Iterator<Item = (&'a str, &'a [serde_json::Value])>,
) -> Option<String> {
    let mut table = format!(
        "{:<16} {:<40} {:<10} {:>7}  {:<34} {:>8}  REQUEST\n",
        "LABEL", "REMOTE JOB", "STATE", "ATTEMPT", "WORKER", "WAITING"
    );
    let mut any = false;
    for (label, jobs) in labels {
        for job in jobs {
            any = true;
            let waiting = job["waiting_secs"]
                .as_u64()
                .map(|s| {
                    retrain_adapters::settings::format_duration(std::time::Duration::from_secs(s))
                })
                .unwrap_or_else(|| "-".into());
            let request = serde_json::from_value::<ResourceRequest>(job["request"].clone())
                .map_or_else(|_| json_cell(&job["request"]), |r| r.describe());
            table.push_str(&format!(
                "{:<16} {:<40} {:<10} {:>7}  {:<34} {:>8}  {}\n",
                label,
                json_cell(&job["job_key"]),
                json_cell(&job["state"]),
                json_cell(&job["attempt"]),
                json_cell(&job["worker_id"]),
                waiting,
                request,
            ));
        }
    }
    any.then_some(table)
}
