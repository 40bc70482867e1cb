//! Shared helpers for the webhook unit tests, and the tests of the common
//! flow ([`WebhookContext::receive`]) with fake effects and a real
//! (in-memory SQLite) delivery log.

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use chrono::Utc;
use retrain_adapters::settings::GithubTrigger;
use retrain_adapters::store::{open_stores, DeliveryLog, DeliveryQuery, StoreOptions};
use retrain_core::domain::Label;
use secrecy::SecretString;

use super::*;

pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.insert(
            HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn bare(name: &str) -> LabelTarget {
    LabelTarget {
        label: Label::new(name).unwrap(),
        dataset_repo: None,
        metadata_triggered: false,
        github: None,
        mlflow_model: None,
    }
}

pub(crate) fn target(name: &str, repo: Option<&str>, metadata_triggered: bool) -> LabelTarget {
    LabelTarget {
        dataset_repo: repo.map(str::to_owned),
        metadata_triggered,
        ..bare(name)
    }
}

pub(crate) fn github_target(name: &str, repo: &str, branch: &str, paths: &[&str]) -> LabelTarget {
    LabelTarget {
        github: Some(GithubTrigger {
            repo: repo.into(),
            branch: branch.into(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
        ..bare(name)
    }
}

pub(crate) fn mlflow_target(name: &str, model: &str) -> LabelTarget {
    LabelTarget {
        mlflow_model: Some(model.into()),
        ..bare(name)
    }
}

/// Records what it was asked to do; `fail` makes `start`/`gate` fail.
#[derive(Default)]
pub(crate) struct FakeEffects {
    pub woken: Mutex<Vec<Label>>,
    pub started: Mutex<Vec<Label>>,
    pub gated: Mutex<Vec<GateRequest>>,
    pub fail: Mutex<bool>,
}

#[async_trait]
impl WebhookEffects for FakeEffects {
    fn wake(&self, labels: &[Label]) {
        self.woken.lock().unwrap().extend_from_slice(labels);
    }
    async fn start(&self, labels: Vec<Label>, _reason: String) -> Result<(), String> {
        if *self.fail.lock().unwrap() {
            return Err("engine unavailable".into());
        }
        self.started.lock().unwrap().extend(labels);
        Ok(())
    }
    async fn gate(&self, requests: Vec<GateRequest>) -> Result<(), String> {
        if *self.fail.lock().unwrap() {
            return Err("registry unavailable".into());
        }
        self.gated.lock().unwrap().extend(requests);
        Ok(())
    }
}

async fn context() -> (WebhookContext, Arc<FakeEffects>, Arc<dyn DeliveryLog>) {
    let stores = open_stores("sqlite::memory:", StoreOptions::default())
        .await
        .unwrap();
    let effects = Arc::new(FakeEffects::default());
    let context = WebhookContext {
        huggingface_secret: Some(SecretString::from("hf-secret")),
        github_secret: Some(SecretString::from("gh-secret")),
        mlflow_secret: Some(SecretString::from("ml-secret")),
        targets: Arc::new(vec![
            LabelTarget {
                github: github_target("dept", "org/data", "main", &[]).github,
                ..target("dept", Some("org/data"), true)
            },
            mlflow_target("seg", "seg"),
        ]),
        deliveries: stores.deliveries.clone(),
        effects: effects.clone(),
        metrics: Some(Arc::new(crate::metrics::Metrics::new())),
    };
    (context, effects, stores.deliveries)
}

async fn log_of(log: &Arc<dyn DeliveryLog>) -> Vec<(String, String, u16, bool)> {
    log.list(&DeliveryQuery {
        source: None,
        before: None,
        limit: 100,
    })
    .await
    .unwrap()
    .into_iter()
    .rev()
    .map(|d| (d.source, d.outcome, d.status, d.claimed))
    .collect()
}

const MLFLOW_BODY: &str = r#"{"entity": "model_version", "action": "created", "timestamp": "2026-01-01T00:00:00+00:00", "data": {"name": "seg", "version": "3", "source": "runs:/abc/model", "run_id": "abc", "tags": {}, "description": null}}"#;

fn mlflow_headers(secret: &[u8], id: &str, ts: i64, body: &str) -> HeaderMap {
    let ts = ts.to_string();
    headers(&[
        ("X-MLflow-Delivery-Id", id),
        ("X-MLflow-Timestamp", &ts),
        (
            "X-MLflow-Signature",
            &mlflow::signature(secret, id, &ts, body.as_bytes()),
        ),
    ])
}

#[tokio::test]
async fn each_source_acts_on_a_valid_delivery_and_logs_it() {
    let (ctx, effects, log) = context().await;
    let now = Utc::now();
    let hf = br#"{"event":{"action":"update","scope":"repo.content"},"repo":{"type":"dataset","name":"org/data"},"updatedRefs":[{"ref":"refs/heads/main","oldSha":"a","newSha":"b"}]}"#;
    let answer = ctx
        .receive(
            WebhookSource::HuggingFace,
            &headers(&[("X-Webhook-Secret", "hf-secret")]),
            hf,
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        (answer.status, answer.code),
        (StatusCode::ACCEPTED, "woken")
    );
    assert_eq!(effects.woken.lock().unwrap().len(), 1);

    let push = br#"{"ref":"refs/heads/main","repository":{"full_name":"org/data"},"commits":[]}"#;
    let gh = headers(&[
        (
            "X-Hub-Signature-256",
            &github::signature(b"gh-secret", push),
        ),
        ("X-GitHub-Event", "push"),
        ("X-GitHub-Delivery", "g-1"),
    ]);
    let answer = ctx
        .receive(WebhookSource::Github, &gh, push, now)
        .await
        .unwrap();
    assert_eq!(answer.code, "started");

    let ml = mlflow_headers(b"ml-secret", "m-1", now.timestamp(), MLFLOW_BODY);
    let answer = ctx
        .receive(WebhookSource::Mlflow, &ml, MLFLOW_BODY.as_bytes(), now)
        .await
        .unwrap();
    assert_eq!(answer.code, "gating");
    let gated = effects.gated.lock().unwrap().clone();
    assert_eq!(gated.len(), 1);
    assert_eq!(gated[0].candidate_id(), "models:/seg/3");
    assert_eq!(gated[0].candidate_run_id.as_deref(), Some("abc"));
    // HF woke and started dept (metadata-triggered); GitHub started it too.
    assert_eq!(effects.started.lock().unwrap().len(), 2);

    assert_eq!(
        log_of(&log).await,
        vec![
            ("huggingface".into(), "woken".into(), 202, false),
            ("github".into(), "started".into(), 202, true),
            ("mlflow".into(), "gating".into(), 202, true),
        ]
    );
}

#[tokio::test]
async fn refused_deliveries_are_logged_and_change_nothing() {
    let (ctx, effects, log) = context().await;
    let now = Utc::now();
    let hf = br#"{"event":{"action":"update","scope":"repo.content"},"repo":{"type":"dataset","name":"org/data"},"updatedRefs":[{"ref":"refs/heads/main","newSha":"b"}]}"#;
    let cases: Vec<(WebhookSource, HeaderMap, Vec<u8>, &str, StatusCode)> = vec![
        (
            WebhookSource::HuggingFace,
            headers(&[("X-Webhook-Secret", "wrong")]),
            hf.to_vec(),
            "bad_signature",
            StatusCode::UNAUTHORIZED,
        ),
        (
            WebhookSource::HuggingFace,
            headers(&[]),
            hf.to_vec(),
            "missing_header",
            StatusCode::UNAUTHORIZED,
        ),
        (
            WebhookSource::HuggingFace,
            headers(&[("X-Webhook-Secret", "hf-secret")]),
            b"{not json".to_vec(),
            "malformed_payload",
            StatusCode::BAD_REQUEST,
        ),
        (
            WebhookSource::Github,
            headers(&[
                ("X-Hub-Signature-256", &github::signature(b"other", b"{}")),
                ("X-GitHub-Event", "push"),
                ("X-GitHub-Delivery", "g-forged"),
            ]),
            b"{}".to_vec(),
            "bad_signature",
            StatusCode::UNAUTHORIZED,
        ),
        (
            WebhookSource::Mlflow,
            mlflow_headers(b"ml-secret", "m-old", now.timestamp() - 600, MLFLOW_BODY),
            MLFLOW_BODY.as_bytes().to_vec(),
            "stale_timestamp",
            StatusCode::UNAUTHORIZED,
        ),
    ];
    for (source, h, body, code, status) in cases {
        let e = ctx.receive(source, &h, &body, now).await.unwrap_err();
        assert_eq!((e.code(), e.status()), (code, status), "{source:?} {e}");
    }
    assert!(effects.woken.lock().unwrap().is_empty());
    assert!(effects.started.lock().unwrap().is_empty());
    assert!(effects.gated.lock().unwrap().is_empty());
    let logged = log_of(&log).await;
    assert_eq!(logged.len(), 5, "{logged:?}");
    assert!(logged.iter().all(|(_, _, _, claimed)| !claimed));
    // The forged GitHub delivery did not burn its id: the real one acts.
    let push = br#"{"ref":"refs/heads/main","repository":{"full_name":"org/data"}}"#;
    let real = headers(&[
        (
            "X-Hub-Signature-256",
            &github::signature(b"gh-secret", push),
        ),
        ("X-GitHub-Event", "push"),
        ("X-GitHub-Delivery", "g-forged"),
    ]);
    ctx.receive(WebhookSource::Github, &real, push, now)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_replayed_delivery_is_refused_and_a_failed_one_can_be_retried() {
    let (ctx, effects, log) = context().await;
    let now = Utc::now();
    let ml = mlflow_headers(b"ml-secret", "m-1", now.timestamp(), MLFLOW_BODY);
    *effects.fail.lock().unwrap() = true;
    let e = ctx
        .receive(WebhookSource::Mlflow, &ml, MLFLOW_BODY.as_bytes(), now)
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.status()),
        ("unavailable", StatusCode::SERVICE_UNAVAILABLE)
    );
    // MLflow retries a 503 with the same delivery id: it acts this time.
    *effects.fail.lock().unwrap() = false;
    ctx.receive(WebhookSource::Mlflow, &ml, MLFLOW_BODY.as_bytes(), now)
        .await
        .unwrap();
    let e = ctx
        .receive(WebhookSource::Mlflow, &ml, MLFLOW_BODY.as_bytes(), now)
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.status()),
        ("replayed_delivery", StatusCode::CONFLICT)
    );
    assert_eq!(effects.gated.lock().unwrap().len(), 1);
    assert_eq!(
        log_of(&log).await,
        vec![
            ("mlflow".into(), "unavailable".into(), 503, false),
            ("mlflow".into(), "gating".into(), 202, true),
            ("mlflow".into(), "replayed_delivery".into(), 409, false),
        ]
    );
    let metrics = ctx.metrics.as_ref().unwrap().render(&[], now);
    assert!(
        metrics.contains(
            r#"retrain_webhook_deliveries_total{source="mlflow",result="replayed_delivery"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_source_without_a_secret_is_not_served_and_pings_are_answered() {
    let (mut ctx, _effects, _log) = context().await;
    let ping = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    let h = headers(&[
        (
            "X-Hub-Signature-256",
            &github::signature(b"gh-secret", ping),
        ),
        ("X-GitHub-Event", "ping"),
        ("X-GitHub-Delivery", "p-1"),
    ]);
    let answer = ctx
        .receive(WebhookSource::Github, &h, ping, Utc::now())
        .await
        .unwrap();
    assert_eq!((answer.status, answer.code), (StatusCode::OK, "ping"));
    ctx.github_secret = None;
    let e = ctx
        .receive(WebhookSource::Github, &h, ping, Utc::now())
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.status()),
        ("not_configured", StatusCode::NOT_FOUND)
    );
}
