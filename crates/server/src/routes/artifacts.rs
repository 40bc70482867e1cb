//! `PUT /v1/runs/{id}/artifacts/{name}` (worker: stream an artifact of a
//! run to `artifacts_dir`) and `GET` (read: stream it back with its ETag).
//! Mounted outside `body_limit` and `request_timeout` (see
//! `routes::streamed`): an upload has its own limit, `artifact_max_bytes`,
//! and must only keep moving (see `crate::artifacts`).

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use retrain_core::domain::RunId;
use serde_json::json;

use super::{Authorized, ReadScope, WorkerScope};
use crate::artifacts::{check_name, UploadError};
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// The run id and artifact name of the path, each one safe segment (400
/// `invalid_artifact_name` otherwise), and the run known to the store (404).
async fn target(
    state: &AppState,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(RunId, String), ApiError> {
    let Path((run, name)) = path.map_err(|e| {
        ApiError::bad_request(
            "invalid_artifact_name",
            format!("artifact path: {}", e.body_text()),
        )
    })?;
    check_name(&name).map_err(|e| {
        ApiError::bad_request(
            "invalid_artifact_name",
            format!("artifact name {name:?} {e}"),
        )
    })?;
    let run_id = RunId(run);
    let known = check_name(run_id.as_str()).is_ok() && state.store.run(&run_id).await?.is_some();
    if !known {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "run_not_found",
            format!("no run with id {run_id}"),
        ));
    }
    Ok((run_id, name))
}

/// `201 {name, size_bytes, sha256}`.
#[utoipa::path(
    put,
    path = "/v1/runs/{id}/artifacts/{name}",
    tag = "artifacts",
    description = "Upload (or replace) an artifact of a run, streamed to `[server] artifacts_dir/<run>/<name>` and hashed (SHA-256) on the way; the record appears in the run's `manifest.artifacts`. Limited by `[server] artifact_max_bytes`, not `body_limit`.",
    params(
        ("id" = String, Path, description = "run id"),
        ("name" = String, Path, description = "one path segment of `[A-Za-z0-9._-]` (not `.` or `..`), at most 200 characters"),
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    security(("bearer" = ["worker"])),
    responses(
        (status = 201, description = "`{name, size_bytes, sha256}`", body = Object),
        (status = 400, description = "`invalid_artifact_name`: nothing written", body = ErrorBody),
        (status = 404, description = "`run_not_found`: nothing written", body = ErrorBody),
        (status = 408, description = "`upload_stalled`: no data for `request_timeout`; nothing kept", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: over `artifact_max_bytes`; nothing kept", body = ErrorBody),
    )
)]
pub async fn upload(
    Authorized(caller, _): Authorized<WorkerScope>,
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (run_id, name) = target(&state, path).await?;
    let artifacts = &state.artifacts;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "artifact larger than [server] artifact_max_bytes ({} bytes)",
                artifacts.max_bytes()
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > artifacts.max_bytes()) {
        return Err(too_large());
    }
    let record = artifacts
        .upload(&run_id, &name, &caller.name, body)
        .await
        .map_err(|e| match e {
            UploadError::TooLarge { .. } => too_large(),
            UploadError::Stalled(_) => {
                ApiError::new(StatusCode::REQUEST_TIMEOUT, "upload_stalled", e.to_string())
            }
            UploadError::Body(_) => ApiError::bad_request("invalid_body", e.to_string()),
            UploadError::Io(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "artifact_write_failed",
                e.to_string(),
            ),
            UploadError::Store(store) => store.into(),
        })?;
    tracing::info!(run_id = %run_id, name, size_bytes = record.size_bytes, by = %caller.name, "artifact uploaded");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "name": record.name,
            "size_bytes": record.size_bytes,
            "sha256": record.sha256,
        })),
    )
        .into_response())
}

/// The bytes, `ETag: "<sha256>"`; `If-None-Match` with it → 304.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/artifacts/{name}",
    tag = "artifacts",
    params(
        ("id" = String, Path, description = "run id"),
        ("name" = String, Path, description = "the artifact's name"),
        ("If-None-Match" = Option<String>, Header, description = "the ETag already held"),
    ),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, description = "the artifact's bytes; `ETag: \"<sha256>\"`", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 304, description = "unchanged (`If-None-Match` matched)"),
        (status = 400, description = "`invalid_artifact_name`", body = ErrorBody),
        (status = 404, description = "`run_not_found` or `artifact_not_found`", body = ErrorBody),
    )
)]
pub async fn download(
    Authorized(_, _): Authorized<ReadScope>,
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (run_id, name) = target(&state, path).await?;
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "artifact_not_found",
            format!("run {run_id} has no artifact {name:?}"),
        )
    };
    let record = state
        .artifacts
        .log()
        .artifact(&run_id, &name)
        .await?
        .ok_or_else(not_found)?;
    let etag = format!("\"{}\"", record.sha256);
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|held| held.split(',').any(|tag| tag.trim() == etag));
    if unchanged {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let file = match tokio::fs::File::open(state.artifacts.path(&run_id, &name)).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "artifact_read_failed",
                format!("reading artifact {name:?} of run {run_id}: {e}"),
            ))
        }
    };
    let length = file.metadata().await.map(|m| m.len()).ok();
    let mut response = Response::new(Body::from_stream(tokio_util::io::ReaderStream::new(file)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(value) = header::HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    if let Some(length) = length {
        headers.insert(header::CONTENT_LENGTH, length.into());
    }
    Ok(response)
}
