//! The audit trail (seed 004, §9): the label's metrics history in its
//! reports.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde_json::json;
use tracing::{info, warn};

use super::Engine;
use crate::domain::RunId;
use crate::history::metric_points_besides;
use crate::machine::{Action, Event, LabelRun, Outcome, Stage};
use crate::report::{with_history, LabelReport, MetricPoint, HISTORY_LEN};

impl Engine {
    /// `report` (of `run`) with the label's last evaluated candidates, `run`
    /// included, for the chart in its markdown. Only gated runs with a
    /// verdict read the store; a read failure leaves the chart out.
    ///
    /// The history is read once per run in this process: the notification
    /// keeps what it read (`keep`) for the cycle report that follows, which
    /// takes it (`list_runs` + up to [`HISTORY_LEN`] `run` reads each time
    /// otherwise). Nothing the history shows changes between the two: the
    /// run's own point is fixed by its verdict, and the label's other runs
    /// cannot move while this engine holds the label's lock.
    pub(super) async fn with_history(
        &self,
        run: &LabelRun,
        report: LabelReport,
        keep: bool,
    ) -> LabelReport {
        let kept = self.history.take(&run.run_id);
        if run.plan.gate.is_none() || run.verdict.is_none() {
            return report;
        }
        let points = match kept {
            Some(points) => points,
            None => match metric_points_besides(
                self.store.as_ref(),
                run.label(),
                Some(HISTORY_LEN),
                Some(run),
            )
            .await
            {
                Ok(points) => points,
                Err(error) => {
                    warn!(%error, "could not read the metrics history; the report has no chart");
                    return report;
                }
            },
        };
        if keep {
            self.history.keep(&run.run_id, points.clone());
        }
        with_history(report, points)
    }

    /// The run leaves this engine's hands (finished, deferred, interrupted,
    /// lock lost, awaiting approval): drop what was kept for it, so that a
    /// long-lived engine holds nothing for runs it no longer drives.
    pub(super) fn forget_run(&self, run_id: &RunId) {
        self.history.take(run_id);
        let mut marks = self.audit_marks.0.lock().unwrap_or_else(|e| e.into_inner());
        marks.remove(run_id);
    }
}

/// The metrics history read for a run's notification, until its report.
#[derive(Debug, Default)]
pub(super) struct KeptHistory(Mutex<HashMap<RunId, Vec<MetricPoint>>>);

impl KeptHistory {
    fn take(&self, run_id: &RunId) -> Option<Vec<MetricPoint>> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        kept.remove(run_id)
    }

    fn keep(&self, run_id: &RunId, points: Vec<MetricPoint>) {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        kept.insert(run_id.clone(), points);
    }
}

/// When each run's previous transition happened (see [`Engine::audit_step`]).
#[derive(Debug, Default)]
pub(super) struct Marks(Mutex<HashMap<RunId, DateTime<Utc>>>);

impl Engine {
    /// One structured event per transition (target `retrain::audit`), the
    /// seed-004 JSONL step record: `run_id`, `label`, `stage` (the stage
    /// entered), `status`, `inputs`/`outputs`/`metrics` as JSON text and
    /// `duration_s` since this run's previous transition in this process.
    /// Only fields of the run's own state: adapters' errors are already
    /// secret-free, and no configuration value is logged.
    pub(super) fn audit_step(&self, run: &LabelRun, from: Stage, event: &Event) {
        // Three JSON documents per transition: build them only when a
        // subscriber records audit steps (JSON logs, `--log-dir`), not on
        // every transition of every run (text logs, embedders, benches).
        if !tracing::enabled!(target: "retrain::audit", tracing::Level::WARN) {
            return;
        }
        let now = self.clock.now();
        let duration_s = {
            let mut marks = self.audit_marks.0.lock().unwrap_or_else(|e| e.into_inner());
            let previous = if run.is_done() {
                marks.remove(&run.run_id)
            } else {
                marks.insert(run.run_id.clone(), now)
            };
            previous.map_or(0.0, |t| {
                (now - t).num_microseconds().unwrap_or(0) as f64 / 1e6
            })
        };
        let dataset = run.dataset.as_ref().map(|d| &d.metadata.version_tag);
        let inputs = json!({
            "from": from.as_str(),
            "watermark": run.cursor.watermark,
            "consumed_version": run.cursor.consumed_version,
            "required_len": run.required_len,
            "last_version": run.last_version,
            "dataset_version": dataset,
            "candidate": run.candidate.as_ref().map(|c| &c.id),
            "baseline": run.baseline.as_ref().map(|b| &b.version),
            "attempt": run.attempt,
        });
        let outputs = json!({
            "event": event.name(),
            "counts": run.counts,
            "measured": run.measured,
            "new_version": dataset,
            "samples": run.dataset.as_ref().map(|d| d.metadata.num_samples),
            "handle": run.handle.as_ref().map(|h| &h.kind),
            "lease": run.lease.as_ref().map(|l| &l.id),
            "verdict": run.verdict.as_ref().map(|v| json!({"passed": v.passed, "forced": v.forced, "reason": v.reason})),
            "promoted": run.promoted.as_ref().map(|p| &p.version),
            "outcome": run.outcome.as_ref().map(|o| o.short()),
            "error": run.step_error.as_deref().or(match &run.outcome {
                Some(Outcome::Failed { reason, .. }) => Some(reason.as_str()),
                _ => None,
            }),
            "next": run.pending.iter().map(action_name).collect::<Vec<_>>(),
        });
        let metrics = run
            .candidate
            .as_ref()
            .map(|c| {
                let finite: serde_json::Map<String, serde_json::Value> = c
                    .metrics
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(v.is_finite().then_some(*v))))
                    .collect();
                serde_json::Value::Object(finite)
            })
            .unwrap_or_else(|| json!({}));
        let status = match &run.outcome {
            Some(outcome) if outcome.is_failure() => "failed",
            _ if run.step_error.is_some() => "deferred",
            Some(_) => "done",
            None => "ok",
        };
        let (inputs, outputs, metrics) =
            (inputs.to_string(), outputs.to_string(), metrics.to_string());
        if status == "failed" || status == "deferred" {
            warn!(target: "retrain::audit", run_id = %run.run_id, label = %run.label(), stage = run.stage.as_str(), status, inputs, outputs, metrics, duration_s, "step");
        } else {
            info!(target: "retrain::audit", run_id = %run.run_id, label = %run.label(), stage = run.stage.as_str(), status, inputs, outputs, metrics, duration_s, "step");
        }
    }
}

/// An action's name: its serde tag (`Action` is internally tagged, so
/// every action serialises as an object with an `action` field).
fn action_name(action: &Action) -> String {
    serde_json::to_value(action)
        .ok()
        .and_then(|v| v.get("action")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}
