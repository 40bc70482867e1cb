//! A label's metrics history, composed from the run store's journal
//! snapshots (`retrain metrics`, the report's chart).

use crate::domain::{Label, RunId};
use crate::journal::RunFilter;
use crate::machine::LabelRun;
use crate::ports::{RunStore, StoreError};
use crate::report::{may_be_evaluated, MetricPoint};

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
pub async fn metric_points_besides(
    store: &dyn RunStore,
    label: &Label,
    limit: Option<usize>,
    current: Option<&LabelRun>,
) -> Result<Vec<MetricPoint>, StoreError> {
    let summaries = store
        .list_runs(&RunFilter {
            label: Some(label.clone()),
            limit: None,
        })
        .await?;
    let current_id: Option<&RunId> = current.map(|r| &r.run_id);
    let mut points = Vec::new();
    if let Some(run) = current {
        let at = summaries
            .iter()
            .find(|s| Some(&s.run_id) == current_id)
            .map(|s| s.started_at)
            .or(run.started_at);
        if let Some(point) = at.and_then(|at| MetricPoint::from_run(run, at)) {
            points.push(point);
        }
    }
    // Newest first.
    let mut summaries = summaries;
    summaries.sort_by_key(|s| std::cmp::Reverse(s.started_at));
    for summary in summaries {
        if limit.is_some_and(|limit| points.len() >= limit) {
            break;
        }
        if Some(&summary.run_id) == current_id || !may_be_evaluated(&summary.outcome) {
            continue;
        }
        let Some(detail) = store.run(&summary.run_id).await? else {
            continue;
        };
        if let Some(point) = MetricPoint::from_run(&detail.snapshot, summary.started_at) {
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
