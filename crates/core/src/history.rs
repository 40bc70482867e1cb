//! A label's metrics history, composed from the run store's journal
//! snapshots (`retrain metrics`, the report's chart).

use crate::domain::{Label, RunId};
use crate::machine::LabelRun;
use crate::ports::{RunStore, StoreError};
use crate::report::MetricPoint;

/// The evaluated candidates of `label`, oldest first: the newest `limit`
/// (all if `None`). Runs that never reached the gate are not read.
pub async fn metric_points(
    store: &dyn RunStore,
    label: &Label,
    limit: Option<usize>,
) -> Result<Vec<MetricPoint>, StoreError> {
    metric_points_besides(store, label, limit, None).await
}

/// Like [`metric_points`], but with `current` (a run not yet, or not fully,
/// journaled) in place of its stored snapshot.
///
/// One store read ([`RunStore::runs_with_verdict`]): one more run than
/// `limit`, since `current` may be among them.
pub async fn metric_points_besides(
    store: &dyn RunStore,
    label: &Label,
    limit: Option<usize>,
    current: Option<&LabelRun>,
) -> Result<Vec<MetricPoint>, StoreError> {
    let stored = store
        .runs_with_verdict(label, limit.map(|limit| limit.saturating_add(1)))
        .await?;
    let current_id: Option<&RunId> = current.map(|r| &r.run_id);
    let mut points = Vec::new();
    if let Some(run) = current {
        // Its start as stored, if it is; a run with a verdict has one.
        let at = stored
            .iter()
            .find(|(_, stored)| Some(&stored.run_id) == current_id)
            .map(|(at, _)| *at)
            .or(run.started_at);
        if let Some(point) = at.and_then(|at| MetricPoint::from_run(run, at)) {
            points.push(point);
        }
    }
    // Newest first.
    for (at, run) in &stored {
        if limit.is_some_and(|limit| points.len() >= limit) {
            break;
        }
        if Some(&run.run_id) == current_id {
            continue;
        }
        if let Some(point) = MetricPoint::from_run(run, *at) {
            points.push(point);
        }
    }
    points.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.run_id.0.cmp(&b.run_id.0)));
    Ok(points)
}

/// The report of a stored run, with the chart of the label's evaluated
/// candidates up to this run when it has a verdict (`runs show --format
/// md`, `GET /v1/runs/{id}/report.md`).
pub async fn stored_run_report(
    store: &dyn RunStore,
    detail: &crate::journal::RunDetail,
) -> Result<crate::report::LabelReport, StoreError> {
    let report = crate::report::LabelReport::from_run(&detail.snapshot, false);
    if detail.snapshot.verdict.is_none() {
        return Ok(report);
    }
    let points = metric_points(store, &detail.summary.label, None)
        .await?
        .into_iter()
        .filter(|p| p.at <= detail.summary.started_at)
        .collect();
    Ok(crate::report::with_history(report, points))
}
