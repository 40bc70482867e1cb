//! GitHub webhooks: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the
//! raw body>` with the configured secret, `X-GitHub-Event` (`ping`, `push`,
//! …) and `X-GitHub-Delivery` (a GUID, kept by manual redeliveries, so it is
//! claimed once). Only `application/json` deliveries are understood.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::{header, LabelTarget, WebhookAction, WebhookError};

pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
pub const EVENT_HEADER: &str = "x-github-event";
pub const DELIVERY_HEADER: &str = "x-github-delivery";

/// A delivery whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub event: String,
    pub id: Option<String>,
}

/// The events we act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GithubEvent {
    Ping,
    Push(Push),
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Push {
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub repository: Repository,
    #[serde(default)]
    pub deleted: bool,
    #[serde(default)]
    pub commits: Vec<Commit>,
    #[serde(default)]
    pub head_commit: Option<Commit>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Repository {
    pub full_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Commit {
    #[serde(default)]
    pub added: Vec<String>,
    #[serde(default)]
    pub removed: Vec<String>,
    #[serde(default)]
    pub modified: Vec<String>,
}

impl Push {
    /// Files the pushed commits touched; `None` when the push lists no
    /// commit (a branch created at an existing commit).
    pub fn changed_files(&self) -> Option<Vec<String>> {
        let commits: Vec<&Commit> = self.commits.iter().chain(&self.head_commit).collect();
        if commits.is_empty() {
            return None;
        }
        let mut files: Vec<String> = commits
            .iter()
            .flat_map(|c| c.added.iter().chain(&c.removed).chain(&c.modified))
            .cloned()
            .collect();
        files.sort();
        files.dedup();
        Some(files)
    }
}

/// `sha256=` + lowercase hex of HMAC-SHA256(secret, body).
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub fn verify(headers: &HeaderMap, body: &[u8], secret: &[u8]) -> Result<Delivery, WebhookError> {
    let presented = header(headers, SIGNATURE_HEADER)?;
    let event = header(headers, EVENT_HEADER)?;
    let bad = || {
        WebhookError::BadSignature(format!(
            "{SIGNATURE_HEADER} does not match the body signed with the configured github_secret"
        ))
    };
    let digest = presented
        .strip_prefix("sha256=")
        .and_then(|h| hex::decode(h).ok())
        .ok_or_else(bad)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&digest).map_err(|_| bad())?;
    Ok(Delivery {
        event: event.to_owned(),
        id: header(headers, DELIVERY_HEADER).ok().map(str::to_owned),
    })
}

pub fn parse(event: &str, body: &[u8]) -> Result<GithubEvent, WebhookError> {
    let malformed = |e: serde_json::Error| {
        WebhookError::MalformedPayload(format!("not a GitHub {event} payload (JSON expected): {e}"))
    };
    match event {
        "ping" => {
            serde_json::from_slice::<serde_json::Value>(body).map_err(malformed)?;
            Ok(GithubEvent::Ping)
        }
        "push" => Ok(GithubEvent::Push(
            serde_json::from_slice(body).map_err(malformed)?,
        )),
        other => {
            serde_json::from_slice::<serde_json::Value>(body).map_err(malformed)?;
            Ok(GithubEvent::Other(other.to_owned()))
        }
    }
}

pub fn route(event: &GithubEvent, targets: &[LabelTarget]) -> WebhookAction {
    let push = match event {
        GithubEvent::Ping => return WebhookAction::Ping,
        GithubEvent::Other(name) => {
            return WebhookAction::Ignored {
                reason: format!("GitHub event {name} is not acted on (only push)"),
            }
        }
        GithubEvent::Push(push) => push,
    };
    if push.deleted {
        return WebhookAction::Ignored {
            reason: format!("{} was deleted", push.git_ref),
        };
    }
    let changed = push.changed_files();
    let labels: Vec<_> = targets
        .iter()
        .filter(|t| {
            t.github.as_ref().is_some_and(|trigger| {
                trigger.matches(
                    &push.repository.full_name,
                    &push.git_ref,
                    changed.as_deref(),
                )
            })
        })
        .map(|t| t.label.clone())
        .collect();
    if labels.is_empty() {
        return WebhookAction::Ignored {
            reason: format!(
                "no label watches {} {} (github_trigger)",
                push.repository.full_name, push.git_ref
            ),
        };
    }
    WebhookAction::StartLabels(labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhooks::tests::{github_target, headers};

    #[test]
    fn githubs_documented_test_vector_verifies() {
        let secret = b"It's a Secret to Everybody";
        let sig = signature(secret, b"Hello, World!");
        assert_eq!(
            sig,
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
        let h = headers(&[
            ("X-Hub-Signature-256", &sig),
            ("X-GitHub-Event", "ping"),
            ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
        ]);
        let delivery = verify(&h, b"Hello, World!", secret).unwrap();
        assert_eq!(delivery.event, "ping");
        assert_eq!(
            delivery.id.as_deref(),
            Some("72d3162e-cc78-11e3-81ab-4c9367dc0958")
        );
    }

    #[test]
    fn wrong_or_missing_signatures_are_refused() {
        let secret = b"s";
        let body = b"{}";
        let good = signature(secret, body);
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (vec![("X-GitHub-Event", "push")], "missing_header"),
            (vec![("X-Hub-Signature-256", &good)], "missing_header"),
            (
                vec![
                    ("X-Hub-Signature-256", "sha256=00"),
                    ("X-GitHub-Event", "push"),
                ],
                "bad_signature",
            ),
            (
                vec![
                    ("X-Hub-Signature-256", "sha1=abc"),
                    ("X-GitHub-Event", "push"),
                ],
                "bad_signature",
            ),
            (
                vec![
                    ("X-Hub-Signature-256", "sha256=zz"),
                    ("X-GitHub-Event", "push"),
                ],
                "bad_signature",
            ),
        ];
        for (h, code) in cases {
            assert_eq!(
                verify(&headers(&h), body, secret).unwrap_err().code(),
                code,
                "{h:?}"
            );
        }
        // The body is signed, not re-serialised JSON: one byte off fails.
        let h = headers(&[("X-Hub-Signature-256", &good), ("X-GitHub-Event", "push")]);
        assert_eq!(
            verify(&h, b"{ }", secret).unwrap_err().code(),
            "bad_signature"
        );
        assert_eq!(verify(&h, body, b"t").unwrap_err().code(), "bad_signature");
    }

    fn push(git_ref: &str, files: &[&str]) -> Vec<u8> {
        serde_json::json!({
            "ref": git_ref, "before": "a", "after": "b", "created": false, "deleted": false,
            "forced": false, "base_ref": null, "compare": "https://github.com/org/data/compare/a...b",
            "commits": [{"id": "b", "tree_id": "t", "distinct": true, "message": "m",
                         "timestamp": "2026-01-01T00:00:00Z", "url": "u",
                         "author": {"name": "n", "email": "e"}, "committer": {"name": "n", "email": "e"},
                         "added": files, "removed": [], "modified": []}],
            "head_commit": null,
            "repository": {"full_name": "org/data"}, "pusher": {"name": "n"}, "sender": {"login": "n"}
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_push_to_a_watched_branch_starts_its_labels() {
        let targets = [
            github_target("dept", "org/data", "main", &[]),
            github_target("seg", "org/data", "main", &["images/"]),
            github_target("other", "org/else", "main", &[]),
        ];
        let event = parse("push", &push("refs/heads/main", &["labels.csv"])).unwrap();
        assert_eq!(
            route(&event, &targets),
            WebhookAction::StartLabels(vec![targets[0].label.clone()])
        );
        let event = parse("push", &push("refs/heads/main", &["images/1.png"])).unwrap();
        assert_eq!(
            route(&event, &targets),
            WebhookAction::StartLabels(vec![targets[0].label.clone(), targets[1].label.clone()])
        );
        let event = parse("push", &push("refs/heads/dev", &["labels.csv"])).unwrap();
        assert!(matches!(
            route(&event, &targets),
            WebhookAction::Ignored { .. }
        ));
        assert_eq!(route(&GithubEvent::Ping, &targets), WebhookAction::Ping);
        let other = parse("pull_request", br#"{"action":"opened"}"#).unwrap();
        assert!(matches!(
            route(&other, &targets),
            WebhookAction::Ignored { .. }
        ));
    }

    #[test]
    fn malformed_pushes_are_refused() {
        for body in [&b"not json"[..], br#"{"ref":"refs/heads/main"}"#, b""] {
            assert_eq!(parse("push", body).unwrap_err().code(), "malformed_payload");
        }
        assert_eq!(parse("ping", b"{").unwrap_err().code(), "malformed_payload");
    }
}
