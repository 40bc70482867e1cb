//! MLflow 3 webhooks (`mlflow/webhooks/delivery.py`):
//!
//! ```text
//! X-MLflow-Delivery-Id: <uuid4>
//! X-MLflow-Timestamp: <unix seconds>
//! X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret, "<delivery_id>.<timestamp>.<raw body>")>
//! {"entity": "model_version", "action": "created", "timestamp": "…", "data": {name, version, source, run_id, tags, description}}
//! ```
//!
//! A timestamp more than [`MAX_SKEW`] away from our clock is refused
//! (`stale_timestamp`), and the delivery id is claimed once (replays →
//! `replayed_delivery`); together they bound what a captured request can do.

use axum::http::HeaderMap;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::{header, GateRequest, LabelTarget, WebhookAction, WebhookError};

pub const SIGNATURE_HEADER: &str = "x-mlflow-signature";
pub const DELIVERY_HEADER: &str = "x-mlflow-delivery-id";
pub const TIMESTAMP_HEADER: &str = "x-mlflow-timestamp";

/// How far a delivery's timestamp may be from our clock.
pub const MAX_SKEW: chrono::Duration = chrono::Duration::minutes(5);

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MlflowEvent {
    pub entity: String,
    pub action: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// `data` of `model_version.created`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ModelVersionCreated {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub run_id: Option<String>,
}

fn mac_of(secret: &[u8], delivery_id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(delivery_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `X-MLflow-Signature` value MLflow sends for this delivery.
pub fn signature(secret: &[u8], delivery_id: &str, timestamp: &str, body: &[u8]) -> String {
    let digest = mac_of(secret, delivery_id, timestamp, body)
        .finalize()
        .into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// Check the signature and the timestamp; returns the delivery id.
pub fn verify(
    headers: &HeaderMap,
    body: &[u8],
    secret: &[u8],
    now: DateTime<Utc>,
) -> Result<String, WebhookError> {
    let delivery_id = header(headers, DELIVERY_HEADER)?;
    let timestamp = header(headers, TIMESTAMP_HEADER)?;
    let presented = header(headers, SIGNATURE_HEADER)?;
    let bad = || {
        WebhookError::BadSignature(format!(
            "{SIGNATURE_HEADER} does not match the delivery signed with the configured mlflow_secret"
        ))
    };
    let digest = presented
        .strip_prefix("v1,")
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .ok_or_else(bad)?;
    // `verify_slice` compares in constant time. The timestamp is checked
    // after the signature so an unsigned request learns nothing from it.
    mac_of(secret, delivery_id, timestamp, body)
        .verify_slice(&digest)
        .map_err(|_| bad())?;
    let sent = timestamp
        .parse::<i64>()
        .ok()
        .and_then(|secs| DateTime::from_timestamp(secs, 0))
        .ok_or_else(|| {
            WebhookError::StaleTimestamp(format!("{TIMESTAMP_HEADER} is not unix seconds"))
        })?;
    if (now - sent).abs() > MAX_SKEW {
        return Err(WebhookError::StaleTimestamp(format!(
            "{TIMESTAMP_HEADER} {sent} is more than {} minutes from this server's clock ({now})",
            MAX_SKEW.num_minutes()
        )));
    }
    Ok(delivery_id.to_owned())
}

pub fn parse(body: &[u8]) -> Result<MlflowEvent, WebhookError> {
    serde_json::from_slice(body)
        .map_err(|e| WebhookError::MalformedPayload(format!("not an MLflow webhook payload: {e}")))
}

/// `model_version.created` of a label's registered model → gate it.
pub fn route(event: &MlflowEvent, targets: &[LabelTarget]) -> Result<WebhookAction, WebhookError> {
    if (event.entity.as_str(), event.action.as_str()) != ("model_version", "created") {
        return Ok(WebhookAction::Ignored {
            reason: format!(
                "MLflow event {}.{} is not acted on (only model_version.created)",
                event.entity, event.action
            ),
        });
    }
    let created: ModelVersionCreated = serde_json::from_value(event.data.clone())
        .map_err(|e| WebhookError::MalformedPayload(format!("model_version.created data: {e}")))?;
    if created.version.is_empty() || !created.version.bytes().all(|b| b.is_ascii_digit()) {
        return Err(WebhookError::MalformedPayload(format!(
            "model_version.created data: version {:?} is not a version number",
            created.version
        )));
    }
    let requests: Vec<GateRequest> = targets
        .iter()
        .filter(|t| t.mlflow_model.as_deref() == Some(created.name.as_str()))
        .map(|t| GateRequest {
            label: t.label.clone(),
            model: created.name.clone(),
            version: created.version.clone(),
            candidate_run_id: created.run_id.clone().filter(|r| !r.is_empty()),
        })
        .collect();
    if requests.is_empty() {
        return Ok(WebhookAction::Ignored {
            reason: format!("no label promotes into MLflow model {}", created.name),
        });
    }
    Ok(WebhookAction::GateModelVersions(requests))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhooks::tests::{headers, mlflow_target};

    /// Python's `json.dumps` default separators, as MLflow sends it.
    const BODY: &str = r#"{"entity": "model_version", "action": "created", "timestamp": "2026-01-01T00:00:00+00:00", "data": {"name": "seg", "version": "3", "source": "models:/m-0123abcd", "run_id": "9f6c17f79cda43c6bed22b82327861ee", "tags": {}, "description": null}}"#;

    fn signed(secret: &[u8], id: &str, ts: i64, body: &str) -> HeaderMap {
        let ts = ts.to_string();
        headers(&[
            ("X-MLflow-Delivery-Id", id),
            ("X-MLflow-Timestamp", &ts),
            (
                "X-MLflow-Signature",
                &signature(secret, id, &ts, body.as_bytes()),
            ),
        ])
    }

    #[test]
    fn a_signed_fresh_delivery_verifies() {
        let now = Utc::now();
        let h = signed(b"k", "d-1", now.timestamp() - 60, BODY);
        assert_eq!(verify(&h, BODY.as_bytes(), b"k", now).unwrap(), "d-1");
    }

    #[test]
    fn the_signature_matches_an_independent_computation() {
        // HMAC-SHA256("key", "id.1.{}") in base64, computed with Python's
        // hmac/base64 modules as MLflow's delivery.py does.
        assert_eq!(
            signature(b"key", "id", "1", b"{}"),
            "v1,5PVmP2AfJGwnp9flV+flrzfukNWA9zyUdqvI+IQalVs="
        );
    }

    #[test]
    fn bad_missing_and_stale_deliveries_are_refused() {
        let now = Utc::now();
        let ts = now.timestamp();
        let body = BODY.as_bytes();
        assert_eq!(
            verify(&signed(b"other", "d", ts, BODY), body, b"k", now)
                .unwrap_err()
                .code(),
            "bad_signature"
        );
        // Signed with another id, timestamp or body: the signature covers them.
        let mut h = signed(b"k", "d", ts, BODY);
        h.insert("x-mlflow-delivery-id", "e".parse().unwrap());
        assert_eq!(
            verify(&h, body, b"k", now).unwrap_err().code(),
            "bad_signature"
        );
        let mut h = signed(b"k", "d", ts, BODY);
        h.insert("x-mlflow-timestamp", (ts + 1).to_string().parse().unwrap());
        assert_eq!(
            verify(&h, body, b"k", now).unwrap_err().code(),
            "bad_signature"
        );
        assert_eq!(
            verify(&signed(b"k", "d", ts, BODY), b"{}", b"k", now)
                .unwrap_err()
                .code(),
            "bad_signature"
        );
        for missing in [
            "x-mlflow-delivery-id",
            "x-mlflow-timestamp",
            "x-mlflow-signature",
        ] {
            let mut h = signed(b"k", "d", ts, BODY);
            h.remove(missing);
            assert_eq!(
                verify(&h, body, b"k", now).unwrap_err(),
                WebhookError::MissingHeader(match missing {
                    "x-mlflow-delivery-id" => DELIVERY_HEADER,
                    "x-mlflow-timestamp" => TIMESTAMP_HEADER,
                    _ => SIGNATURE_HEADER,
                })
            );
        }
        let stale = signed(b"k", "d", ts - 301, BODY);
        assert_eq!(
            verify(&stale, body, b"k", now).unwrap_err().code(),
            "stale_timestamp"
        );
        let future = signed(b"k", "d", ts + 301, BODY);
        assert_eq!(
            verify(&future, body, b"k", now).unwrap_err().code(),
            "stale_timestamp"
        );
        let mut h = headers(&[
            ("X-MLflow-Delivery-Id", "d"),
            ("X-MLflow-Timestamp", "yesterday"),
            (
                "X-MLflow-Signature",
                &signature(b"k", "d", "yesterday", body),
            ),
        ]);
        assert_eq!(
            verify(&h, body, b"k", now).unwrap_err().code(),
            "stale_timestamp"
        );
        h.insert("x-mlflow-signature", "v2,abc".parse().unwrap());
        assert_eq!(
            verify(&h, body, b"k", now).unwrap_err().code(),
            "bad_signature"
        );
    }

    #[test]
    fn a_created_version_of_a_labels_model_is_gated() {
        let targets = [
            mlflow_target("seg", "seg"),
            mlflow_target("seg2", "seg"),
            mlflow_target("dept", "dept"),
        ];
        let action = route(&parse(BODY.as_bytes()).unwrap(), &targets).unwrap();
        let WebhookAction::GateModelVersions(requests) = action else {
            panic!("{action:?}")
        };
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0].label, targets[0].label);
        assert_eq!(requests[0].version, "3");
        assert_eq!(requests[0].candidate_id(), "models:/seg/3");
        assert_eq!(
            requests[0].candidate_run_id.as_deref(),
            Some("9f6c17f79cda43c6bed22b82327861ee")
        );
    }

    #[test]
    fn other_events_and_models_are_ignored_and_bad_data_refused() {
        let targets = [mlflow_target("seg", "seg")];
        let other_model = BODY.replace(r#""name": "seg""#, r#""name": "other""#);
        let alias = BODY.replace(
            r#""entity": "model_version""#,
            r#""entity": "model_version_alias""#,
        );
        for body in [other_model, alias] {
            assert!(matches!(
                route(&parse(body.as_bytes()).unwrap(), &targets).unwrap(),
                WebhookAction::Ignored { .. }
            ));
        }
        let no_version = BODY.replace(r#""version": "3", "#, "");
        let bad_version = BODY.replace(r#""version": "3""#, r#""version": "../3""#);
        for body in [no_version, bad_version] {
            assert_eq!(
                route(&parse(body.as_bytes()).unwrap(), &targets)
                    .unwrap_err()
                    .code(),
                "malformed_payload"
            );
        }
        assert_eq!(parse(b"{nope").unwrap_err().code(), "malformed_payload");
    }
}
