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
use axum::routing::{get, post};
use axum::{Json, Router};
use retrain_adapters::settings::Scope;
use retrain_adapters::store::{Delivery, DeliveryQuery};
use serde::Deserialize;
use serde_json::json;

use super::effects::EngineEffects;
use super::{WebhookContext, WebhookSource};
use crate::error::ApiError;
use crate::routes::{body, query, Authorized, ReadScope};
use crate::state::AppState;

/// The webhook, delivery-log and metrics routes (merged into the API's).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/hooks/huggingface", post(huggingface))
        .route("/v1/hooks/github", post(github))
        .route("/v1/hooks/mlflow", post(mlflow))
        .route("/v1/webhooks/deliveries", get(deliveries))
        .route("/metrics", get(metrics))
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
pub async fn huggingface(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    receive(&state, WebhookSource::HuggingFace, &headers, bytes).await
}

/// `POST /v1/hooks/github`.
pub async fn github(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    receive(&state, WebhookSource::Github, &headers, bytes).await
}

/// `POST /v1/hooks/mlflow`.
pub async fn mlflow(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    receive(&state, WebhookSource::Mlflow, &headers, bytes).await
}

/// `GET /v1/webhooks/deliveries?source=&cursor=&limit=`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    pub source: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<i64>,
    /// 1..=500, default 50.
    pub limit: Option<u32>,
}

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

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
