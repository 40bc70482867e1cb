//! `GET /openapi.json` against the routes actually mounted: every
//! documented operation is answered by its handler (not by the router's
//! fallbacks) and guarded by the scope it documents; every path the source
//! mounts by hand is documented.

use std::collections::BTreeSet;
use std::path::Path;

use reqwest::Method;
use serde_json::Value;

use crate::support::{spawn_app, Store, READER};

/// The document's operations: (method, path template, security roles,
/// whether "no token" is an accepted alternative).
fn operations(document: &Value) -> Vec<(Method, String, Vec<String>, bool)> {
    let mut operations = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().unwrap() {
            let method: Method = method.to_uppercase().parse().unwrap();
            let requirements = operation["security"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let open = requirements.is_empty()
                || requirements
                    .iter()
                    .any(|r| r.as_object().is_some_and(|r| r.is_empty()));
            let roles = requirements
                .iter()
                .filter_map(|r| r["bearer"].as_array())
                .flatten()
                .map(|role| role.as_str().unwrap().to_owned())
                .collect();
            operations.push((method, path.clone(), roles, open));
        }
    }
    operations
}

/// `/v1/runs/{id}` → `/v1/runs/no-such-id`.
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|segment| match segment.strip_prefix('{') {
            Some(name) => format!("no-such-{}", name.trim_end_matches('}')),
            None => segment.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_mounted_and_guarded_by_its_scope() {
    let (_workspace, app) = spawn_app(Store::Sqlite).await;
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let document: Value = response.json().await.unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let error = &document["components"]["schemas"]["ErrorBody"];
    assert_eq!(error["required"], serde_json::json!(["error"]), "{error}");

    // What the router's fallbacks answer: a documented operation must never
    // get these (that would mean it is documented but not mounted).
    let unrouted = app
        .client
        .get(app.url("/v1/no/such/route"))
        .send()
        .await
        .unwrap();
    assert_eq!(unrouted.status(), 404);
    let unrouted = unrouted.text().await.unwrap();
    let wrong_method = app.client.delete(app.url("/healthz")).send().await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    let wrong_method = wrong_method.text().await.unwrap();

    let operations = operations(&document);
    let paths: BTreeSet<&str> = operations.iter().map(|(_, p, _, _)| p.as_str()).collect();
    for expected in [
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/metrics",
        "/v1/runs",
        "/v1/runs/{id}",
        "/v1/labels",
        "/v1/events",
        "/v1/hooks/huggingface",
        "/v1/hooks/github",
        "/v1/hooks/mlflow",
        "/v1/webhooks/deliveries",
    ] {
        assert!(paths.contains(expected), "{expected} is not documented");
    }
    for (method, template, roles, open) in &operations {
        let path = concrete(template);
        // Without a token: answered by the route (its handler or its
        // guard), never by a fallback.
        let response = app
            .client
            .request(method.clone(), app.url(&path))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert!(
            body != unrouted && body != wrong_method,
            "{method} {template} is documented but not mounted ({status}: {body})"
        );
        let documented = &document["paths"][template][method.as_str().to_lowercase()];
        if roles.is_empty() {
            continue;
        }
        for code in ["401", "403", "default"] {
            assert!(
                documented["responses"][code].is_object(),
                "{method} {template}: no {code} response documented"
            );
        }
        if !open {
            assert_eq!(status, 401, "{method} {template} answered without a token");
        }
        // The documented scope is the one enforced: a read-only token is
        // refused exactly where the document asks for more than `read`.
        let response = app
            .client
            .request(method.clone(), app.url(&path))
            .bearer_auth(READER)
            .send()
            .await
            .unwrap();
        let refused = response.status() == 403;
        let needs_more_than_read = !roles.iter().any(|role| role == "read");
        assert_eq!(
            refused,
            needs_more_than_read,
            "{method} {template} documents scopes {roles:?} but answered {} to a read-only token",
            response.status()
        );
    }
    app.shutdown().await.unwrap();
}

/// Every `.route(` / `.route_service(` / `.nest(` path literal in the
/// server's source (these mount without documenting) must be a documented
/// path; the routes mounted through `routes!` are documented by
/// construction.
#[test]
fn every_path_mounted_by_hand_is_documented() {
    let document = serde_json::to_value(retrain_server::routes::openapi()).unwrap();
    let documented: BTreeSet<String> = document["paths"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let mut mounted = Vec::new();
    collect_mounted_paths(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut mounted,
    );
    let undocumented: Vec<_> = mounted
        .iter()
        .filter(|(_, path)| !documented.contains(path))
        .collect();
    assert!(
        undocumented.is_empty(),
        "mounted with .route(..) but not in /openapi.json (mount with `.routes(routes!(handler))` and a #[utoipa::path]): {undocumented:?}"
    );
}

fn collect_mounted_paths(dir: &Path, found: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_mounted_paths(&path, found);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        for line in source.lines() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for call in [".route(\"", ".route_service(\"", ".nest(\""] {
                for (at, _) in code.match_indices(call) {
                    let rest = &code[at + call.len()..];
                    let literal = rest.split('"').next().unwrap_or_default();
                    found.push((path.display().to_string(), literal.to_owned()));
                }
            }
        }
    }
}
