//! Short forms of the wiremock routes the tests mount by the dozen (one
//! method, one path, one canned answer), so that a test shows what the fake
//! service answers rather than the builder chain.

use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Answers `verb path` with `status` and the JSON `body`; chain `.expect(n)`,
/// `.up_to_n_times(n)` or `.named(…)` as needed, then `.mount(&server)`.
pub fn json_route(
    verb: &str,
    route: impl Into<String>,
    status: u16,
    body: serde_json::Value,
) -> Mock {
    Mock::given(method(verb))
        .and(path(route))
        .respond_with(ResponseTemplate::new(status).set_body_json(body))
}

/// Answers `verb path` with `status` and no body.
pub fn status_route(verb: &str, route: impl Into<String>, status: u16) -> Mock {
    Mock::given(method(verb))
        .and(path(route))
        .respond_with(ResponseTemplate::new(status))
}

/// The requests `server` received so far, as `"METHOD /path"`, in order.
///
/// # Panics
/// When the server does not record requests: a test helper.
pub async fn calls(server: &MockServer) -> Vec<String> {
    server
        .received_requests()
        .await
        .expect("the mock server records requests")
        .iter()
        .map(|r| format!("{} {}", r.method, r.url.path()))
        .collect()
}
