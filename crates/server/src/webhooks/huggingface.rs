//! Hugging Face Hub webhooks (payload version 3).
//!
//! The Hub sends the configured secret verbatim in `X-Webhook-Secret` (no
//! HMAC), so it is compared in constant time. A dataset commit is
//! `event = {action: "update", scope: "repo.content"}` with `repo.type =
//! "dataset"`; a new pull request fires the same scope, so the push must
//! also name `refs/heads/main` in `updatedRefs`. The Hub sends no delivery
//! id: deliveries are not de-duplicated (waking a poll or starting a label
//! that is already running is harmless).

use axum::http::HeaderMap;
use serde::Deserialize;

use super::{header, secrets_match, LabelTarget, WebhookAction, WebhookError};

pub const SECRET_HEADER: &str = "x-webhook-secret";

/// The fields of a v3 payload we read (others are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HubEvent {
    pub event: EventKind,
    pub repo: Repo,
    #[serde(default, rename = "updatedRefs")]
    pub updated_refs: Vec<UpdatedRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EventKind {
    pub action: String,
    pub scope: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Repo {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    /// `headSha` in the JSON (`huggingface_hub`'s model says `head_sha`).
    #[serde(default, rename = "headSha", alias = "head_sha")]
    pub head_sha: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct UpdatedRef {
    #[serde(rename = "ref")]
    pub git_ref: String,
    #[serde(default, rename = "newSha")]
    pub new_sha: Option<String>,
}

pub fn verify(headers: &HeaderMap, secret: &[u8]) -> Result<(), WebhookError> {
    let presented = header(headers, SECRET_HEADER)?;
    if secrets_match(presented.as_bytes(), secret) {
        Ok(())
    } else {
        Err(WebhookError::BadSignature(format!(
            "{SECRET_HEADER} does not match the configured huggingface_secret"
        )))
    }
}

pub fn parse(body: &[u8]) -> Result<HubEvent, WebhookError> {
    serde_json::from_slice(body).map_err(|e| {
        WebhookError::MalformedPayload(format!("not a Hugging Face webhook (v3) payload: {e}"))
    })
}

/// A new commit on the `main` branch of a dataset repo wakes every label
/// whose metadata lives in that repo, and starts the metadata-triggered
/// ones.
pub fn route(event: &HubEvent, targets: &[LabelTarget]) -> WebhookAction {
    let content_update = event.event.action == "update"
        && event.event.scope.starts_with("repo.content")
        && event.repo.kind == "dataset";
    if !content_update {
        return WebhookAction::Ignored {
            reason: format!(
                "{} {} of {} {} is not a dataset commit",
                event.event.scope, event.event.action, event.repo.kind, event.repo.name
            ),
        };
    }
    let on_main = event
        .updated_refs
        .iter()
        .any(|r| r.git_ref == "refs/heads/main" && r.new_sha.is_some());
    if !on_main {
        return WebhookAction::Ignored {
            reason: format!(
                "dataset {} changed, but not refs/heads/main (a pull request?)",
                event.repo.name
            ),
        };
    }
    let concerned: Vec<&LabelTarget> = targets
        .iter()
        .filter(|t| {
            t.dataset_repo
                .as_deref()
                .is_some_and(|repo| repo.eq_ignore_ascii_case(&event.repo.name))
        })
        .collect();
    if concerned.is_empty() {
        return WebhookAction::Ignored {
            reason: format!(
                "no label reads its metadata from dataset {}",
                event.repo.name
            ),
        };
    }
    WebhookAction::WakeLabels {
        labels: concerned.iter().map(|t| t.label.clone()).collect(),
        start: concerned
            .iter()
            .filter(|t| t.metadata_triggered)
            .map(|t| t.label.clone())
            .collect(),
    }
}

/// `owner/name` of the Hub dataset a metadata address points to:
/// `hf://datasets/owner/name[@rev]/path` or
/// `http(s)://<hub>/datasets/owner/name/resolve/<rev>/path` (any host, so a
/// private Hub endpoint works too). Anything else has none.
pub fn dataset_repo_of(metadata: &str) -> Option<String> {
    let metadata = metadata.trim();
    let rest = if let Some(rest) = metadata.strip_prefix("hf://datasets/") {
        rest
    } else {
        let after_scheme = metadata
            .strip_prefix("https://")
            .or_else(|| metadata.strip_prefix("http://"))?;
        let (_host, path) = after_scheme.split_once('/')?;
        let rest = path.strip_prefix("datasets/")?;
        // Only resolve URLs name a file of a repo.
        let mut parts = rest.splitn(4, '/');
        let (_, _, resolve) = (parts.next(), parts.next(), parts.next());
        if resolve != Some("resolve") {
            return None;
        }
        rest
    };
    let mut parts = rest.splitn(3, '/');
    let owner = parts.next()?;
    let name = parts.next()?;
    let name = name.split('@').next().unwrap_or(name);
    let owner = owner.split('@').next().unwrap_or(owner);
    (!owner.is_empty() && !name.is_empty()).then(|| format!("{owner}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhooks::tests::{headers, target};

    const COMMIT: &str = r#"{"event":{"action":"update","scope":"repo.content"},
        "repo":{"type":"dataset","name":"org/data","id":"6366c0","private":false,
          "url":{"web":"https://huggingface.co/datasets/org/data","api":"https://huggingface.co/api/datasets/org/data"},
          "headSha":"575db8b7","owner":{"id":"61d200"}},
        "updatedRefs":[{"ref":"refs/heads/main","oldSha":"ce9a4674","newSha":"575db8b7"}],
        "webhook":{"id":"6390e8","version":3}}"#;

    #[test]
    fn the_secret_header_is_required_and_compared() {
        verify(&headers(&[("X-Webhook-Secret", "s3cret")]), b"s3cret").unwrap();
        assert_eq!(
            verify(&headers(&[]), b"s3cret").unwrap_err(),
            WebhookError::MissingHeader(SECRET_HEADER)
        );
        let wrong = verify(&headers(&[("X-Webhook-Secret", "s3cre")]), b"s3cret").unwrap_err();
        assert_eq!(wrong.code(), "bad_signature");
        assert!(!wrong.to_string().contains("s3cret"), "{wrong}");
    }

    #[test]
    fn a_dataset_commit_wakes_its_labels_and_starts_the_metadata_triggered() {
        let event = parse(COMMIT.as_bytes()).unwrap();
        assert_eq!(event.repo.head_sha.as_deref(), Some("575db8b7"));
        let targets = [
            target("dept", Some("org/data"), false),
            target("seg", Some("ORG/Data"), true),
            target("other", Some("org/else"), true),
        ];
        assert_eq!(
            route(&event, &targets),
            WebhookAction::WakeLabels {
                labels: vec![targets[0].label.clone(), targets[1].label.clone()],
                start: vec![targets[1].label.clone()],
            }
        );
    }

    #[test]
    fn other_events_are_ignored() {
        let targets = [target("dept", Some("org/data"), true)];
        let variant = |from: &str, to: &str| parse(COMMIT.replace(from, to).as_bytes()).unwrap();
        for event in [
            variant(r#""type":"dataset""#, r#""type":"model""#),
            variant(r#""scope":"repo.content""#, r#""scope":"repo.config""#),
            variant("refs/heads/main", "refs/pr/3"),
            variant(r#""newSha":"575db8b7""#, r#""newSha":null"#),
            variant(r#""name":"org/data""#, r#""name":"org/unrelated""#),
        ] {
            assert!(
                matches!(route(&event, &targets), WebhookAction::Ignored { .. }),
                "{event:?}"
            );
        }
    }

    #[test]
    fn malformed_payloads_are_refused() {
        for body in ["", "{", r#"{"event":{}}"#, r#"{"repo":{"type":"dataset"}}"#] {
            assert_eq!(
                parse(body.as_bytes()).unwrap_err().code(),
                "malformed_payload"
            );
        }
    }

    #[test]
    fn dataset_repos_come_from_metadata_addresses() {
        for (address, repo) in [
            (
                "hf://datasets/org/data/dataset_metadata.json",
                Some("org/data"),
            ),
            ("hf://datasets/org/data@v1/meta/m.json", Some("org/data")),
            (
                "https://huggingface.co/datasets/org/data/resolve/main/dataset_metadata.json",
                Some("org/data"),
            ),
            (
                "http://127.0.0.1:4000/datasets/o/d/resolve/main/m.json",
                Some("o/d"),
            ),
            ("https://huggingface.co/datasets/org/data", None),
            ("s3://bucket/key.json", None),
            ("file://m.json", None),
        ] {
            assert_eq!(dataset_repo_of(address).as_deref(), repo, "{address}");
        }
    }
}
