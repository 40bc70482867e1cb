//! `GET /v1/labels`: each configured label's state, a page at a time.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use retrain_core::domain::Label;
use retrain_core::journal::RunFilter;
use retrain_core::machine::Stage;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{query, Authorized, ReadScope};
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LabelsQuery {
    /// `next_cursor` of the previous page (a label name).
    pub cursor: Option<String>,
    /// Page size, 1..=1000 (default 100).
    pub limit: Option<u32>,
}

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

/// Threshold, watermark, last consumed version, the stage of the run under
/// way, the last verdict, the production version (from the promotion
/// history), the runs awaiting approval and who holds the label's lock.
#[utoipa::path(
    get,
    path = "/v1/labels",
    tag = "labels",
    params(LabelsQuery),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, description = "`{labels: [{label, threshold, watermark, last_consumed_version, running, locked_by, last_verdict, production_version, production_since, awaiting_approval}], next_cursor}`", body = Object),
        (status = 400, description = "invalid query", body = ErrorBody),
    )
)]
pub async fn list(
    Authorized(_, _): Authorized<ReadScope>,
    State(state): State<AppState>,
    params: Result<Query<LabelsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = query(params)?;
    let limit = params.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE) as usize;
    let store = state.store.as_ref();
    // Labels are listed in name order; the cursor is the last one served.
    let mut page: Vec<(&Label, _)> = state
        .settings
        .labels
        .iter()
        .filter(|(label, _)| {
            params
                .cursor
                .as_deref()
                .is_none_or(|cursor| label.as_str() > cursor)
        })
        .take(limit + 1)
        .collect();
    let next_cursor = (page.len() > limit).then(|| page[limit - 1].0.to_string());
    page.truncate(limit);
    let mut rows = Vec::with_capacity(page.len());
    for (label, settings) in page {
        let cursor = store.cursor(label).await?;
        let running = store.unfinished_run(label).await?;
        let holder = store.lock_holder(label).await?;
        let runs = store
            .list_runs(&RunFilter {
                label: Some(label.clone()),
                limit: None,
            })
            .await?;
        let awaiting: Vec<_> = runs
            .iter()
            .filter(|r| r.stage == Stage::AwaitingApproval)
            .map(|r| &r.run_id)
            .collect();
        let last_verdict = match runs
            .iter()
            .find(|r| r.stage == Stage::Done || r.stage == Stage::AwaitingApproval)
        {
            Some(summary) => store
                .run(&summary.run_id)
                .await?
                .and_then(|d| d.snapshot.verdict)
                .map(|v| json!({"run_id": summary.run_id, "verdict": v})),
            None => None,
        };
        let production = store.promotions(label).await?.pop();
        rows.push(json!({
            "label": label,
            "threshold": settings.threshold,
            "watermark": cursor.watermark,
            "last_consumed_version": cursor.consumed_version,
            "running": running.map(|r| json!({"run_id": r.run_id, "stage": r.stage})),
            "locked_by": holder,
            "last_verdict": last_verdict,
            "production_version": production.as_ref().map(|p| &p.version),
            "production_since": production.as_ref().map(|p| p.at),
            "awaiting_approval": awaiting,
        }));
    }
    Ok(Json(json!({"labels": rows, "next_cursor": next_cursor})))
}
