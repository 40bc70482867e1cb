//! `GET /openapi.json`: the OpenAPI 3.1 document of the API, generated from
//! the handlers' `#[utoipa::path]` attributes. Routes are mounted with
//! utoipa-axum's `OpenApiRouter::routes(routes!(handler))`, so one line
//! both mounts a handler and documents it; `tests/it/openapi.rs` checks the
//! document against what the server actually answers.
//!
//! Conventions the document follows:
//! - an operation that needs a token carries the `bearer` security
//!   requirement with the scope it needs as its role (`["read"]`, …;
//!   `admin` implies every scope); `/metrics` lists "no token" as an
//!   alternative (`[server] metrics_require_auth`);
//! - every operation may answer the error shape ([`ErrorBody`]): [`document`]
//!   adds `401`/`403` to the secured operations and a `default` response to
//!   all, so handlers list only their own specific errors.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi as _};

use crate::error::ErrorBody;

/// The name of the bearer security scheme in the document.
pub const BEARER: &str = "bearer";

/// The document's fixed parts: info, the security scheme, the error schema.
/// The paths come from the routes (see [`super::openapi`]).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "retrain-server",
        description = "retrain behind HTTP: triggers, runs, approvals, rollbacks, lifecycle events (SSE), signed webhooks, remote workers and artifacts. Errors are `{\"error\": {\"code\", \"message\"}}` with stable codes (docs/server.md, \"Errors\")."
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerScheme)
)]
#[derive(Debug)]
pub struct ApiDoc;

#[derive(Debug)]
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.description = Some(
            "A token of `[[server.tokens]]` (or RETRAIN_SERVER_TOKEN), compared in constant time. The roles of a requirement are the scopes it needs; `admin` implies all.".into(),
        );
        components.add_security_scheme(BEARER, SecurityScheme::Http(http));
    }
}

/// Adds the error responses every operation shares (see the module doc).
pub fn add_common_responses(openapi: &mut OpenApi) {
    let error = || {
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ErrorBody")))
            .build()
    };
    let response = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content("application/json", error())
            .build()
    };
    for item in openapi.paths.paths.values_mut() {
        let operations: [&mut Option<Operation>; 5] = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            let secured = operation
                .security
                .as_ref()
                .is_some_and(|requirements| !requirements.is_empty());
            let responses = &mut operation.responses.responses;
            if secured {
                responses
                    .entry("401".into())
                    .or_insert_with(|| response("missing or unknown bearer token").into());
                responses.entry("403".into()).or_insert_with(|| {
                    response("the token lacks the scope this operation needs").into()
                });
            }
            responses.entry("default".into()).or_insert_with(|| {
                response("any other error, with a stable `code` (docs/server.md, \"Errors\")")
                    .into()
            });
        }
    }
}

/// The document as served (built once).
fn document_json() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        super::openapi()
            .to_json()
            .expect("an OpenAPI document always serializes to JSON")
    })
}

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "this document (OpenAPI 3.1)", body = Object, content_type = "application/json"))
)]
pub async fn document() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
        .into_response()
}

/// The fixed parts of the document.
pub fn base() -> OpenApi {
    ApiDoc::openapi()
}
