//! `GET /healthz` (the process answers) and `GET /readyz` (the run store
//! answers with this version's schema). Both are open: load balancers and
//! the container `HEALTHCHECK` carry no token.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// The process answers.
#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses((status = 200, description = "`ok`", body = String, content_type = "text/plain")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Reads what this version needs (runs and journal positions, the newest
/// migration): a store that is down or behind answers 503.
#[utoipa::path(get, path = "/readyz", tag = "meta",
    responses(
        (status = 200, description = "`{status: \"ready\", journal_position}`", body = Object),
        (status = 503, description = "the run store is down or its schema is behind", body = ErrorBody),
    ))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let not_ready = |e: retrain_core::ports::StoreError| {
        ApiError::unavailable(format!("run store not ready: {e}"))
    };
    let position = state.store.journal_end().await.map_err(not_ready)?;
    state
        .store
        .list_runs(&retrain_core::journal::RunFilter {
            label: None,
            limit: Some(1),
        })
        .await
        .map_err(not_ready)?;
    Ok(Json(
        json!({"status": "ready", "journal_position": position}),
    ))
}
