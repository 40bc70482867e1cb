//! Inbound webhooks over HTTP: a valid delivery acts; refused ones (wrong
//! or missing signature, stale timestamp, replayed id, malformed JSON) are
//! 4xx, recorded in `GET /v1/webhooks/deliveries`, and start nothing;
//! `/metrics` counts them.

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::support::*;

const GITHUB_SECRET: &str = "gh-webhook-secret";
const MLFLOW_SECRET: &str = "ml-webhook-secret";
const HF_SECRET: &str = "hf-webhook-secret";

/// The harness's workspace with webhook secrets and a GitHub trigger on
/// `intent`.
fn hooked(store: &Store) -> Workspace {
    let workspace = Workspace::new(store);
    let config = std::fs::read_to_string(workspace.config()).unwrap();
    let config = config.replacen(
        "[labels.intent]\n",
        "[labels.intent]\ngithub_trigger = { repo = \"org/data\", branch = \"main\", paths = [\"data/\"] }\n",
        1,
    );
    let config = format!(
        "{config}\n[server.webhooks]\ngithub_secret = \"{GITHUB_SECRET}\"\nmlflow_secret = \"{MLFLOW_SECRET}\"\nhuggingface_secret = \"{HF_SECRET}\"\n"
    );
    std::fs::write(workspace.config(), config).unwrap();
    workspace
}

fn github_signature(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(GITHUB_SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn push(files: &[&str]) -> Vec<u8> {
    serde_json::json!({
        "ref": "refs/heads/main", "before": "a", "after": "b", "created": false,
        "deleted": false, "forced": false, "base_ref": null, "compare": "c",
        "commits": [{"id": "b", "added": files, "removed": [], "modified": []}],
        "head_commit": {"id": "b", "added": files, "removed": [], "modified": []},
        "repository": {"full_name": "org/data"}, "pusher": {"name": "n"}, "sender": {"login": "n"}
    })
    .to_string()
    .into_bytes()
}

async fn github(app: &TestApp, id: &str, signature: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut request = app
        .client
        .post(app.url("/v1/hooks/github"))
        .header("X-GitHub-Event", "push")
        .header("X-GitHub-Delivery", id)
        .header("Content-Type", "application/json");
    if let Some(signature) = signature {
        request = request.header("X-Hub-Signature-256", signature);
    }
    let response = request.body(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn deliveries(app: &TestApp, query: &str) -> Value {
    let response = app
        .get(&format!("/v1/webhooks/deliveries{query}"), READER)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn wait_starts(workspace: &Workspace, label: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while workspace.starts(label) < n {
        assert!(
            Instant::now() < deadline,
            "{label} never started {n} training(s)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn github_push_starts_its_label_and_refusals_change_nothing(store: Store) {
    let workspace = hooked(&store);
    let app = spawn_in(&workspace).await;

    // Refused first: nothing may start.
    let body = push(&["data/tickets.csv"]);
    let (status, answer) = github(
        &app,
        "d-forged",
        Some(&github_signature(b"other")),
        body.clone(),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("bad_signature"))
    );
    let (status, answer) = github(&app, "d-unsigned", None, body.clone()).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("missing_header"))
    );
    let malformed = b"{\"ref\": ".to_vec();
    let (status, answer) = github(
        &app,
        "d-bad",
        Some(&github_signature(&malformed)),
        malformed,
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("malformed_payload"))
    );
    // A push outside the watched paths is answered and ignored.
    let readme = push(&["README.md"]);
    let (status, answer) = github(&app, "d-readme", Some(&github_signature(&readme)), readme).await;
    assert_eq!((status, answer["result"].as_str()), (200, Some("ignored")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(workspace.starts("intent"), 0);
    let runs: Value = app
        .get("/v1/runs", READER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(runs["runs"].as_array().map(Vec::len), Some(0), "{runs}");

    // The signed push acts (its id was not burnt by the forged one).
    let (status, answer) = github(
        &app,
        "d-forged",
        Some(&github_signature(&body)),
        body.clone(),
    )
    .await;
    assert_eq!(
        (status, answer["result"].as_str()),
        (202, Some("started")),
        "{answer}"
    );
    wait_starts(&workspace, "intent", 1).await;
    assert_eq!(
        workspace.starts("urgency"),
        0,
        "only the watching label starts"
    );
    // GitHub's redelivery of the same id is refused.
    let (status, answer) = github(&app, "d-forged", Some(&github_signature(&body)), body).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (409, Some("replayed_delivery"))
    );

    // A stale MLflow delivery, properly signed, is refused too.
    let ts = (chrono::Utc::now().timestamp() - 600).to_string();
    let ml_body = r#"{"entity": "model_version", "action": "created", "data": {"name": "x", "version": "1"}}"#;
    let mut mac = Hmac::<Sha256>::new_from_slice(MLFLOW_SECRET.as_bytes()).unwrap();
    mac.update(format!("m-1.{ts}.{ml_body}").as_bytes());
    use base64::Engine as _;
    let sig = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    let response = app
        .client
        .post(app.url("/v1/hooks/mlflow"))
        .header("X-MLflow-Delivery-Id", "m-1")
        .header("X-MLflow-Timestamp", &ts)
        .header("X-MLflow-Signature", sig)
        .body(ml_body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "stale_timestamp");
    // HF without its secret header.
    let response = app
        .client
        .post(app.url("/v1/hooks/huggingface"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    // Every delivery is in the log, newest first, paginated.
    let page = deliveries(&app, "?limit=3").await;
    let outcomes: Vec<&str> = page["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        vec!["missing_header", "stale_timestamp", "replayed_delivery"]
    );
    let cursor = page["next_cursor"].as_i64().unwrap();
    let rest = deliveries(&app, &format!("?cursor={cursor}&limit=50")).await;
    let outcomes: Vec<&str> = rest["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        vec![
            "started",
            "ignored",
            "malformed_payload",
            "missing_header",
            "bad_signature"
        ]
    );
    assert!(rest["next_cursor"].is_null());
    let github_only = deliveries(&app, "?source=mlflow").await;
    assert_eq!(github_only["deliveries"].as_array().unwrap().len(), 1);
    // The log needs a token.
    let anonymous = app
        .client
        .get(app.url("/v1/webhooks/deliveries"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    // Metrics: deliveries by source/result, HTTP requests by route/status.
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    for line in [
        r#"retrain_webhook_deliveries_total{source="github",result="started"} 1"#,
        r#"retrain_webhook_deliveries_total{source="github",result="replayed_delivery"} 1"#,
        r#"retrain_webhook_deliveries_total{source="mlflow",result="stale_timestamp"} 1"#,
        r#"retrain_http_requests_total{route="/v1/hooks/github",status="401"} 2"#,
        "retrain_open_leases 0",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_github_push_starts_its_label_and_refusals_change_nothing() {
    github_push_starts_its_label_and_refusals_change_nothing(Store::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_github_push_starts_its_label_and_refusals_change_nothing() {
    let Some(store) = Store::postgres().await else {
        return;
    };
    github_push_starts_its_label_and_refusals_change_nothing(store).await;
}
