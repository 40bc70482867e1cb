//! `GET /v1/labels`: each configured label's state, a page at a time.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use retrain_core::domain::Label;
use retrain_core::domain::{RunId, VersionTag};
use retrain_core::machine::Stage;
use serde::{Deserialize, Serialize};

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
/// way, the newest run's verdict, the production version (the newest event
/// of the store's promotion history, not a registry call: the registry of
/// 1,000 labels would cost 1,000 calls per page, and the history is what
/// retrain itself promoted or rolled back), the runs awaiting approval and
/// who holds the label's lock: all from one store statement per page.
#[utoipa::path(
    get,
    path = "/v1/labels",
    tag = "labels",
    params(LabelsQuery),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, description = "`{labels: [{label, threshold, watermark, last_consumed_version, running: {run_id, stage}|null, locked_by, last_verdict: {run_id, reason}|null, production_version, production_since, awaiting_approval: [run_id]}], next_cursor}`", body = Object),
        (status = 400, description = "invalid query", body = ErrorBody),
    )
)]
pub async fn list(
    Authorized(_, _): Authorized<ReadScope>,
    State(state): State<AppState>,
    params: Result<Query<LabelsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
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
    // One statement for the whole page (`RunStore::label_statuses`): no
    // read per label, so a page of 1,000 labels costs one query.
    let labels: Vec<Label> = page.iter().map(|(label, _)| (*label).clone()).collect();
    let statuses = store.label_statuses(&labels).await?;
    let labels: Vec<LabelView<'_>> = page
        .iter()
        .zip(&statuses)
        .map(|((label, settings), status)| {
            let last = status.last_run.as_ref();
            LabelView {
                label,
                threshold: settings.threshold,
                watermark: status.cursor.watermark,
                last_consumed_version: status.cursor.consumed_version.as_ref(),
                running: last
                    .filter(|run| run.stage != Stage::Done)
                    .map(|run| RunningView {
                        run_id: &run.run_id,
                        stage: run.stage,
                    }),
                locked_by: status.locked_by.as_deref(),
                last_verdict: match (last, &status.last_verdict) {
                    (Some(run), Some(reason)) => Some(VerdictView {
                        run_id: &run.run_id,
                        reason,
                    }),
                    _ => None,
                },
                production_version: status.production.as_ref().map(|p| p.version.as_str()),
                production_since: status.production.as_ref().map(|p| p.since),
                awaiting_approval: &status.waiting,
            }
        })
        .collect();
    // Serialised straight from the views (no `serde_json::Value` tree: a
    // page of 1,000 labels was thousands of small maps built and dropped).
    Ok(Json(LabelsPage {
        labels,
        next_cursor,
    })
    .into_response())
}

/// The response of `GET /v1/labels`.
#[derive(Serialize)]
struct LabelsPage<'a> {
    labels: Vec<LabelView<'a>>,
    next_cursor: Option<String>,
}

#[derive(Serialize)]
struct LabelView<'a> {
    label: &'a Label,
    threshold: u64,
    watermark: Option<DateTime<Utc>>,
    last_consumed_version: Option<&'a VersionTag>,
    running: Option<RunningView<'a>>,
    locked_by: Option<&'a str>,
    last_verdict: Option<VerdictView<'a>>,
    production_version: Option<&'a str>,
    production_since: Option<DateTime<Utc>>,
    awaiting_approval: &'a [RunId],
}

#[derive(Serialize)]
struct RunningView<'a> {
    run_id: &'a RunId,
    stage: Stage,
}

#[derive(Serialize)]
struct VerdictView<'a> {
    run_id: &'a RunId,
    reason: &'a str,
}
