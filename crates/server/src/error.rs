//! API errors: `{"error": {"code": "...", "message": "..."}}` with a stable
//! `code` per kind of failure (clients branch on the code, people read the
//! message). Messages name what was wrong and never carry a secret.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use retrain_core::engine::EngineError;
use retrain_core::ports::StoreError;
use serde_json::json;

/// One failed request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, snake_case (see `docs/server.md`, "Errors").
    pub code: &'static str,
    pub message: String,
}

/// The error shape, for the OpenAPI document (the response itself is built
/// by [`ApiError::into_response`]).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)] // Only its schema is used.
pub struct ErrorBody {
    error: ErrorDetail,
}

/// `error` of [`ErrorBody`].
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// Stable, snake_case: clients branch on it (`unauthorized`,
    /// `forbidden`, `not_found`, `invalid_body`, `label_busy`, …).
    code: String,
    /// For people: names what was wrong; never carries a secret.
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(_) => Self::unavailable(error.to_string()),
            StoreError::Fenced(_) => Self::conflict("label_busy", error.to_string()),
            StoreError::Conflict(_) => Self::conflict("conflict", error.to_string()),
            StoreError::Corrupt(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_corrupt",
                error.to_string(),
            ),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        let message = error.to_string();
        match error {
            EngineError::UnknownLabel(..) => Self::bad_request("unknown_label", message),
            EngineError::Store(store) => store.into(),
            EngineError::Port(_) => Self::new(StatusCode::BAD_GATEWAY, "upstream_failed", message),
            EngineError::NoRegistry(_) | EngineError::NoGate(_) => {
                Self::conflict("not_configured", message)
            }
            EngineError::Busy(..) => Self::conflict("label_busy", message),
            EngineError::NoSuchRun(_) => Self::not_found(message),
            EngineError::ApprovalClosed { .. } => Self::conflict("approval_closed", message),
            EngineError::RollbackRefused(_) => Self::conflict("rollback_refused", message),
            EngineError::NotAwaitingApproval(..) => {
                Self::conflict("not_awaiting_approval", message)
            }
            EngineError::ProductionChanged { .. } => Self::conflict(
                "production_changed",
                // The CLI's hint names `--regate`; over HTTP it is a field.
                message.replace("approve with --regate", "approve with {\"regate\": true}"),
            ),
        }
    }
}
