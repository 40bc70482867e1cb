//! The HTTP side of webhooks, the delivery log and `/metrics`:
//! `POST /v1/hooks/{huggingface,github,mlflow}` (no bearer token: each
//! source has its own secret), `GET /v1/webhooks/deliveries` (`read`,
//! cursor-paginated) and `GET /metrics` (`read` when
//! `[server] metrics_require_auth`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use retrain_adapters::settings::Scope;
use retrain_adapters::store::{Delivery, DeliveryQuery};
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::effects::EngineEffects;
use super::{WebhookContext, WebhookSource};
use crate::error::{ApiError, ErrorBody};
use crate::routes::{body, query, Authorized, ReadScope};
use crate::state::AppState;

/// The webhook, delivery-log and metrics routes (merged into the API's).
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(huggingface))
        .routes(routes!(github))
        .routes(routes!(mlflow))
        .routes(routes!(deliveries))
        .routes(routes!(metrics))
}

/// What a webhook answers (the same for every source).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Only its schema is used: `receive` builds the responses.
enum WebhookResponses {
    /// `ping` answered, or an event that concerns no label (ignored).
    #[response(status = 200)]
    Ignored(WebhookAnswer),
    /// The delivery acted (a poll woken, a cycle started, a version gated).
    #[response(status = 202)]
    Acted(WebhookAnswer),
    /// Malformed payload: recorded, nothing changed.
    #[response(status = 400)]
    Malformed(ErrorBody),
    /// Wrong or missing secret/signature, or a stale timestamp: recorded,
    /// nothing changed.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// This source has no secret configured.
    #[response(status = 404)]
    NotConfigured(ErrorBody),
    /// A delivery id already received (replay): nothing changed.
    #[response(status = 409)]
    Replayed(ErrorBody),
}

/// The body of an accepted delivery.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
struct WebhookAnswer {
    /// What the delivery did (`ping`, `ignored`, `woken`, `started`, `gating`).
    result: String,
    message: String,
}

fn context(state: &AppState) -> WebhookContext {
    let secrets = &state.settings.server.webhooks;
    WebhookContext {
        huggingface_secret: secrets.huggingface_secret.clone(),
        github_secret: secrets.github_secret.clone(),
        mlflow_secret: secrets.mlflow_secret.clone(),
        targets: state.webhook_targets.clone(),
        deliveries: state.deliveries.clone(),
        effects: Arc::new(EngineEffects::new(state.clone(), state.metrics.clone())),
        metrics: Some(state.metrics.clone()),
    }
}

async fn receive(
    state: &AppState,
    source: WebhookSource,
    headers: &HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(bytes)?;
    let now = chrono::Utc::now();
    match context(state).receive(source, headers, &bytes, now).await {
        Ok(answer) => Ok((
            answer.status,
            Json(json!({"result": answer.code, "message": answer.message})),
        )
            .into_response()),
        Err(e) => {
            tracing::info!(source = source.as_str(), code = e.code(), error = %e, "webhook delivery refused");
            Err(ApiError::new(e.status(), e.code(), e.to_string()))
        }
    }
}

/// `POST /v1/hooks/huggingface`.
#[utoipa::path(
    post,
    path = "/v1/hooks/huggingface",
    tag = "webhooks",
    description = "A Hugging Face Hub webhook (payload v3). No bearer token: `X-Webhook-Secret` must equal `[server.webhooks] huggingface_secret`. A `repo.content` update of a dataset a label's metadata points to wakes that label's poll (and starts a cycle for metadata-triggered labels). Every delivery is recorded (`GET /v1/webhooks/deliveries`).",
    params(("X-Webhook-Secret" = String, Header, description = "the shared secret")),
    request_body(content = Object, content_type = "application/json", description = "HF webhook payload v3 (`event`, `repo`, `updatedRefs`)"),
    responses(WebhookResponses)
)]
pub async fn huggingface(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    receive(&state, WebhookSource::HuggingFace, &headers, bytes).await
}

/// `POST /v1/hooks/github`.
#[utoipa::path(
    post,
    path = "/v1/hooks/github",
    tag = "webhooks",
    description = "A GitHub webhook. No bearer token: `X-Hub-Signature-256` is the HMAC-SHA256 of the raw body with `[server.webhooks] github_secret`. `ping` is answered; a `push` to a label's `github_trigger` repo/branch (and paths) starts that label's cycle.",
    params(
        ("X-Hub-Signature-256" = String, Header, description = "`sha256=<hex HMAC-SHA256 of the body>`"),
        ("X-GitHub-Event" = String, Header, description = "`push`, `ping`, …"),
        ("X-GitHub-Delivery" = String, Header, description = "delivery id (replays refused)"),
    ),
    request_body(content = Object, content_type = "application/json", description = "GitHub event payload"),
    responses(WebhookResponses)
)]
pub async fn github(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    receive(&state, WebhookSource::Github, &headers, bytes).await
}

/// `POST /v1/hooks/mlflow`.
#[utoipa::path(
    post,
    path = "/v1/hooks/mlflow",
    tag = "webhooks",
    description = "An MLflow 3 webhook. No bearer token: `X-MLflow-Signature: v1,<base64 HMAC-SHA256 of \"{delivery_id}.{timestamp}.{payload}\">` with `[server.webhooks] mlflow_secret`; timestamps older than 5 minutes and repeated delivery ids are refused. `model_version.created` for a label's registered model gates that version against production (a run starting at gating).",
    params(
        ("X-MLflow-Signature" = String, Header, description = "`v1,<base64 HMAC-SHA256>`"),
        ("X-MLflow-Delivery-Id" = String, Header, description = "delivery id (replays refused)"),
        ("X-MLflow-Timestamp" = String, Header, description = "Unix seconds (older than 5 minutes refused)"),
    ),
    request_body(content = Object, content_type = "application/json", description = "MLflow webhook payload (`entity`, `action`, `data`)"),
    responses(WebhookResponses)
)]
pub async fn mlflow(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    receive(&state, WebhookSource::Mlflow, &headers, bytes).await
}

/// `GET /v1/webhooks/deliveries?source=&cursor=&limit=`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    /// `huggingface`, `github`, `mlflow` or `schedule`.
    pub source: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<i64>,
    /// 1..=500, default 50.
    pub limit: Option<u32>,
}

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

/// Every webhook delivery and schedule tick with its outcome, newest first.
#[utoipa::path(
    get,
    path = "/v1/webhooks/deliveries",
    tag = "webhooks",
    params(DeliveriesQuery),
    security(("bearer" = ["read"])),
    responses((status = 200, description = "`{deliveries: [...], next_cursor}`", body = Object))
)]
pub async fn deliveries(
    _reader: Authorized<ReadScope>,
    State(state): State<AppState>,
    params: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let params = query(params)?;
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1..={MAX_PAGE}, got {limit}"),
        ));
    }
    let page: Vec<Delivery> = state
        .deliveries
        .list(&DeliveryQuery {
            source: params.source,
            before: params.cursor,
            limit,
        })
        .await?;
    let next_cursor = (page.len() == limit as usize)
        .then(|| page.last().map(|d| d.seq))
        .flatten();
    Ok(Json(json!({
        "deliveries": page,
        "next_cursor": next_cursor,
    })))
}

/// `GET /metrics`: Prometheus/OpenMetrics text.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    description = "Prometheus/OpenMetrics text: runs by outcome, stage durations, retries, leases, lock takeovers, webhook deliveries, HTTP requests. Needs the `read` scope only when `[server] metrics_require_auth`.",
    security((), ("bearer" = ["read"])),
    responses((status = 200, description = "OpenMetrics text", body = String, content_type = "application/openmetrics-text"))
)]
pub async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if state.settings.server.metrics_require_auth {
        state.tokens.authorize(&headers, Scope::Read)?;
    }
    let leases = state.store.active_leases().await?;
    let workers = state.jobs.queue.workers().await?;
    let queue = state.jobs.queue.queue().await?;
    state.metrics.set_workers(&workers, &queue);
    state.metrics.set_counted_elsewhere(
        crate::metrics::EngineCounts {
            lock_takeovers: state.engine.lock_takeovers(),
            metadata_reads_skipped: state.engine.metadata_reads_skipped(),
        },
        &retrain_adapters::http::retries(),
    );
    let text = state.metrics.render(&leases, chrono::Utc::now());
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// Counts every routed request by route template and status.
pub async fn count_requests(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    state
        .metrics
        .http_request(&route, response.status().as_u16());
    response
}
