//! Shared helpers for adapter integration tests.

/// The URL of a real service for a test, from `var`.
///
/// Unset: returns `None` after printing a skip notice, or panics when
/// `CI=true` (a CI run must exercise the real thing).
#[allow(dead_code)]
pub fn service_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ => {
            if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
                panic!("{var} is not set but CI=true: .ci/run must start the service and export {var}");
            }
            eprintln!("skipped: {var} is not set (run scripts/test.sh to start the service)");
            None
        }
    }
}
