//! The HTTP routes, one module per resource, and the request parts they
//! share: scope-checked callers, JSON/YAML bodies and query strings whose
//! rejections use the API's error shape.

pub mod artifacts;
pub mod events;
pub mod health;
pub mod labels;
pub mod openapi;
pub mod rollback;
pub mod runs;
pub mod workers;

use std::marker::PhantomData;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Router;
use retrain_adapters::settings::Scope;
use serde::de::DeserializeOwned;
use tower_http::timeout::TimeoutLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;
use crate::webhooks::routes as hooks;

/// Every route of the server.
pub fn router(state: AppState) -> Router {
    router_with(state, Vec::new())
}

/// The API's routes plus `extra` (see `Application::merge_routes`), under
/// the same limits.
pub fn router_with(state: AppState, extra: Vec<Router<AppState>>) -> Router {
    let server = &state.settings.server;
    let body_limit = server.body_limit;
    let request_timeout = server.request_timeout;
    let (bounded, _) = bounded().split_for_parts();
    let (streamed, _) = streamed().split_for_parts();
    extra
        .into_iter()
        .fold(bounded, Router::merge)
        .layer(DefaultBodyLimit::max(body_limit))
        // Until the response head: an event stream is not cut by it.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        // Merged after the layers above, which apply only to the routes
        // already there.
        .merge(streamed)
        .fallback(not_found)
        // After every route is in: it applies to the routes present.
        .method_not_allowed_fallback(method_not_allowed)
        // Matched routes only (the route template is the metric's label).
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            hooks::count_requests,
        ))
        .with_state(state)
}

/// The API's own routes, without state or layers, each mounted and
/// documented by the same `routes!` line (handlers sharing a path go in one
/// `routes!`). Never `.route(..)`: it would mount without documenting
/// (`tests/it/openapi.rs` fails on it).
fn api() -> OpenApiRouter<AppState> {
    bounded().merge(streamed())
}

/// The routes under `[server] body_limit` and `request_timeout`.
fn bounded() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(openapi::document))
        .routes(routes!(runs::trigger, runs::list))
        .routes(routes!(runs::show))
        .routes(routes!(runs::report_md))
        .routes(routes!(runs::approve))
        .routes(routes!(runs::reject))
        .routes(routes!(labels::list))
        .routes(routes!(rollback::rollback))
        .routes(routes!(events::stream))
        // Remote workers and their jobs (docs/server.md, "Workers").
        .routes(routes!(workers::register, workers::list))
        .routes(routes!(workers::queue))
        .routes(routes!(workers::show, workers::deregister))
        .routes(routes!(workers::heartbeat))
        .routes(routes!(workers::lease_job))
        .routes(routes!(workers::logs))
        .routes(routes!(workers::results))
        .routes(routes!(workers::cleanup))
        .merge(hooks::router())
}

/// The routes whose request bodies are streamed under their own limit
/// (`artifact_max_bytes`, an idle timeout per chunk): neither `body_limit`
/// nor `request_timeout` (a whole-request deadline) applies to them.
fn streamed() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(artifacts::upload, artifacts::download))
}

/// The OpenAPI document of every route [`router`] mounts (served at
/// `GET /openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut document = api().into_openapi();
    openapi::add_common_responses(&mut document);
    document
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// A scope, as a type, for [`Authorized`].
pub trait RequiredScope {
    const SCOPE: Scope;
}

macro_rules! scopes {
    ($($name:ident => $scope:ident),* $(,)?) => {
        $(
            #[doc = concat!("The `", stringify!($scope), "` scope.")]
            #[derive(Debug)]
            pub struct $name;
            impl RequiredScope for $name {
                const SCOPE: Scope = Scope::$scope;
            }
        )*
    };
}

scopes!(
    ReadScope => Read,
    TriggerScope => Trigger,
    ApproveScope => Approve,
    RollbackScope => Rollback,
    WorkerScope => Worker,
    AdminScope => Admin
);

/// The caller of a request, authorized for `S`. As the first extractor of
/// a handler it runs before the body is read: a request without the right
/// token is refused before anything else happens.
#[derive(Debug)]
pub struct Authorized<S>(pub Caller, pub PhantomData<S>);

impl<S: RequiredScope + Send> FromRequestParts<AppState> for Authorized<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = state.tokens.authorize(&parts.headers, S::SCOPE)?;
        Ok(Self(caller, PhantomData))
    }
}

/// A query string as `T`, or a 400 naming the problem.
pub fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query.map(|Query(q)| q).map_err(|e| {
        ApiError::bad_request(
            "invalid_query",
            format!("invalid query string: {}", e.body_text()),
        )
    })
}

/// A request body within the body limit (413 beyond it).
pub fn body(bytes: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    bytes.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body larger than [server] body_limit",
            )
        } else {
            ApiError::bad_request("invalid_body", e.body_text())
        }
    })
}

/// A body as `T`: JSON (`application/json`), YAML (`text/yaml`,
/// `application/yaml`, as seed 003 submits) or empty (`T::default()`).
pub fn parse_body<T: DeserializeOwned + Default>(
    headers: &HeaderMap,
    bytes: &Bytes,
) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request("invalid_body", format!("invalid JSON body: {e}"))),
        "text/yaml" | "application/yaml" | "application/x-yaml" | "text/x-yaml" => {
            serde_norway::from_slice(bytes).map_err(|e| {
                ApiError::bad_request("invalid_body", format!("invalid YAML body: {e}"))
            })
        }
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type {other:?}: expected application/json or text/yaml{}",
                if other == "application/x-www-form-urlencoded" {
                    " (curl -d sends a form by default: add -H 'Content-Type: application/json')"
                } else {
                    ""
                }
            ),
        )),
    }
}
