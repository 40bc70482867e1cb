//! `POST /v1/labels/{label}/rollback`: move a label's production back to an
//! earlier registry version (`Engine::rollback`, the same operation as
//! `retrain rollback`), identity = the token's name.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use retrain_core::domain::Label;
use retrain_core::engine::RollbackRequest;
use serde::Deserialize;
use serde_json::json;

use super::{body, parse_body, Authorized, RollbackScope};
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// The version to restore; absent: the production version before the
    /// current one.
    #[serde(default)]
    pub to_version: Option<String>,
    /// Why (required, journaled and shown by `retrain history`).
    #[serde(default)]
    pub reason: Option<String>,
    /// Allow a version that never was production for this label.
    #[serde(default)]
    pub force: bool,
}

#[utoipa::path(
    post,
    path = "/v1/labels/{label}/rollback",
    tag = "labels",
    params(("label" = String, Path, description = "a configured label")),
    request_body(content = RollbackBody, content_type = "application/json"),
    security(("bearer" = ["rollback"])),
    responses(
        (status = 200, description = "`{label, rolled_back_by, resumed, status, report}`", body = Object),
        (status = 400, description = "`invalid_label`, `unknown_label` or `reason_required`", body = ErrorBody),
        (status = 409, description = "`rollback_refused`, `not_configured` (no registry) or `label_busy`", body = ErrorBody),
    )
)]
pub async fn rollback(
    Authorized(caller, _): Authorized<RollbackScope>,
    State(state): State<AppState>,
    Path(raw_label): Path<String>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: RollbackBody = parse_body(&headers, &body(bytes)?)?;
    let label = Label::new(&raw_label)
        .map_err(|e| ApiError::bad_request("invalid_label", format!("label {raw_label:?}: {e}")))?;
    let Some(reason) = body.reason.filter(|r| !r.trim().is_empty()) else {
        return Err(ApiError::bad_request(
            "reason_required",
            "a rollback needs a reason: {\"reason\": \"…\"}",
        ));
    };
    let request = RollbackRequest {
        label,
        to_version: body.to_version,
        by: caller.name.clone(),
        reason,
        force: body.force,
    };
    // A tracked task: the rollback drives its run to the end even if the
    // client hangs up.
    let engine = state.engine.clone();
    let outcome = state
        .work
        .spawn(async move { engine.rollback(request).await })
        .await
        .map_err(|_| ApiError::unavailable("the server is shutting down"))??;
    // A rollback is a run of its own: counted as a cycle's runs are.
    state
        .metrics
        .observe_finished(state.store.as_ref(), outcome.report.run_id.clone())
        .await;
    Ok(Json(json!({
        "label": raw_label,
        "rolled_back_by": caller.name,
        "resumed": outcome.resumed,
        "status": outcome.report.status.as_str(),
        "report": outcome.report,
    }))
    .into_response())
}
