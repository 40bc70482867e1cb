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
    let runs: Value = app.read_json("/v1/runs").await;
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

/// Test data on the real MLflow server, over its REST API.
struct Mlflow {
    api: String,
    http: reqwest::Client,
    experiment: String,
}

impl Mlflow {
    async fn new(base: &str) -> Self {
        let api = format!("{}/api/2.0/mlflow", base.trim_end_matches('/'));
        let http = reqwest::Client::new();
        let mut me = Self {
            api,
            http,
            experiment: String::new(),
        };
        let created = me
            .post(
                "experiments/create",
                serde_json::json!({"name": format!("hooks-{}", uuid_like())}),
            )
            .await;
        me.experiment = created["experiment_id"].as_str().unwrap().to_owned();
        me
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let response = self
            .http
            .post(format!("{}/{path}", self.api))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    /// A finished run with `dice`, registered as the next version of `model`.
    async fn register(&self, model: &str, dice: f64) -> (String, String) {
        let run = self
            .post(
                "runs/create",
                serde_json::json!({"experiment_id": self.experiment, "start_time": 1}),
            )
            .await;
        let run_id = run["run"]["info"]["run_id"].as_str().unwrap().to_owned();
        self.post(
            "runs/log-metric",
            serde_json::json!({"run_id": run_id, "key": "dice", "value": dice, "timestamp": 1, "step": 0}),
        )
        .await;
        let version = self
            .post(
                "model-versions/create",
                serde_json::json!({"name": model, "source": format!("runs:/{run_id}/model"), "run_id": run_id}),
            )
            .await;
        (
            version["model_version"]["version"]
                .as_str()
                .unwrap()
                .to_owned(),
            run_id,
        )
    }

    async fn production(&self, model: &str) -> Option<String> {
        let answer: Value = self
            .http
            .get(format!("{}/registered-models/alias", self.api))
            .query(&[("name", model), ("alias", "production")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["model_version"]["version"]
            .as_str()
            .map(str::to_owned)
    }
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// What MLflow 3 posts for `model_version.created` (Python `json.dumps`
/// separators), signed as `delivery.py` does.
async fn mlflow_created(
    app: &TestApp,
    id: &str,
    model: &str,
    version: &str,
    run_id: &str,
) -> (u16, Value) {
    use base64::Engine as _;
    let body = format!(
        r#"{{"entity": "model_version", "action": "created", "timestamp": "2026-01-01T00:00:00+00:00", "data": {{"name": "{model}", "version": "{version}", "source": "runs:/{run_id}/model", "run_id": "{run_id}", "tags": {{}}, "description": null}}}}"#
    );
    let ts = chrono::Utc::now().timestamp().to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(MLFLOW_SECRET.as_bytes()).unwrap();
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    let signature = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    let response = app
        .client
        .post(app.url("/v1/hooks/mlflow"))
        .header("Content-Type", "application/json")
        .header("X-MLflow-Delivery-Id", id)
        .header("X-MLflow-Timestamp", ts)
        .header("X-MLflow-Signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The finished runs of `label` (outcome per run), newest first.
async fn outcomes(app: &TestApp, label: &str) -> Vec<String> {
    let runs: Value = app.read_json(&format!("/v1/runs?label={label}")).await;
    runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A registered model with version 1 (dice 0.80) in production, and a
/// workspace whose label `seg` gates that model's versions on dice.
async fn mlflow_label(url: &str) -> (Mlflow, String, Workspace) {
    let mlflow = Mlflow::new(url).await;
    let model = format!("hooks-seg-{}", uuid_like());
    mlflow
        .post(
            "registered-models/create",
            serde_json::json!({"name": model}),
        )
        .await;
    let (v1, _) = mlflow.register(&model, 0.80).await;
    mlflow
        .post(
            "registered-models/alias",
            serde_json::json!({"name": model, "alias": "production", "version": v1}),
        )
        .await;

    let workspace = hooked(&Store::Sqlite);
    let config = std::fs::read_to_string(workspace.config()).unwrap();
    let label = format!(
        "\n[labels.seg]\nthreshold = 1\ncounts = \"none\"\nmetadata = \"file://metadata.json\"\ntrainer = {{ command = [\"sh\", \"train.sh\"] }}\nregistry = {{ mlflow = \"{url}\", model = \"{model}\" }}\ngate = {{ metrics = [{{ name = \"dice\", direction = \"higher\" }}] }}\n"
    );
    // Before `[server.webhooks]`, which closes the file.
    let config = config.replacen(
        "\n[server.webhooks]",
        &format!("{label}\n[server.webhooks]"),
        1,
    );
    std::fs::write(workspace.config(), config).unwrap();
    (mlflow, model, workspace)
}

/// Wait until `model`'s production alias points at `version`.
async fn wait_production(mlflow: &Mlflow, model: &str, version: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while mlflow.production(model).await.as_deref() != Some(version) {
        assert!(
            Instant::now() < deadline,
            "the alias never moved to version {version}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gate the previous server process accepted (the delivery was answered
/// 202) but had not done when it stopped — the label's run held the lock —
/// is resumed at start-up from the store, without a new delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_accepted_before_a_restart_is_done_after_it() {
    let Some(url) = retrain_adapters::testing::services::service_url("RETRAIN_TEST_MLFLOW_URL")
    else {
        return;
    };
    let (mlflow, model, workspace) = mlflow_label(&url).await;
    let (v2, run2) = mlflow.register(&model, 0.90).await;
    let stores = retrain_adapters::store::open_stores(
        &workspace.state,
        retrain_adapters::store::StoreOptions {
            migrate: true,
            read_only: false,
        },
    )
    .await
    .unwrap();
    stores
        .pending_gates
        .add(&retrain_adapters::store::PendingGate {
            label: "seg".into(),
            model: model.clone(),
            version: v2.clone(),
            candidate_run_id: Some(run2),
            received_at: chrono::Utc::now(),
        })
        .await
        .unwrap();

    let app = spawn_in(&workspace).await;
    wait_production(&mlflow, &model, &v2).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stores.pending_gates.list().await.unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the pending gate was not cleared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.shutdown().await.unwrap();
    assert_eq!(outcomes_len(&workspace).await, 1, "gated once");
}

/// Against the real `mlflow server`: a better registered version, announced
/// by a signed webhook, is gated and promoted (the alias moves to it); a
/// worse one is rejected and the alias stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlflow_webhook_promotes_a_better_version_and_rejects_a_worse_one() {
    let Some(url) = retrain_adapters::testing::services::service_url("RETRAIN_TEST_MLFLOW_URL")
    else {
        return;
    };
    let (mlflow, model, workspace) = mlflow_label(&url).await;
    let app = spawn_in(&workspace).await;

    let (v2, run2) = mlflow.register(&model, 0.90).await;
    let (status, answer) = mlflow_created(&app, "delivery-2", &model, &v2, &run2).await;
    assert_eq!(
        (status, answer["result"].as_str()),
        (202, Some("gating")),
        "{answer}"
    );
    wait_production(&mlflow, &model, &v2).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while outcomes(&app, "seg").await != vec!["promoted".to_owned()] {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            outcomes(&app, "seg").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (v3, run3) = mlflow.register(&model, 0.50).await;
    let (status, _) = mlflow_created(&app, "delivery-3", &model, &v3, &run3).await;
    assert_eq!(status, 202);
    let deadline = Instant::now() + Duration::from_secs(60);
    while outcomes(&app, "seg").await.first().map(String::as_str) != Some("rejected") {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            outcomes(&app, "seg").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(mlflow.production(&model).await, Some(v2.clone()));
    // The replayed delivery does not gate again.
    let (status, _) = mlflow_created(&app, "delivery-3", &model, &v3, &run3).await;
    assert_eq!(status, 409);
    app.shutdown().await.unwrap();
    assert_eq!(outcomes_len(&workspace).await, 2);
}

async fn outcomes_len(workspace: &Workspace) -> usize {
    let store = workspace.store().await;
    store
        .list_runs(&retrain_core::journal::RunFilter {
            label: Some(retrain_core::domain::Label::new("seg").unwrap()),
            limit: None,
        })
        .await
        .unwrap()
        .len()
}

/// End to end with the fake Hub: a run waits for a new dataset with
/// `poll_interval = 60s`; the Hub's webhook on publication wakes its poll,
/// and the training starts within 200 ms instead of a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_webhook_on_publication_wakes_the_waiting_label_at_once() {
    use retrain_adapters::testing::fake_hub::FakeHub;
    let hub = FakeHub::start().await;
    let repo = "org/tickets";
    let path = "dataset_metadata.json";
    let metadata = |tag: &str, n: u64| {
        serde_json::json!({"dataset_name": "tickets", "version_tag": tag, "num_samples": n,
                           "created_at": "2026-01-02T00:00:00Z"})
    };
    hub.add_dataset(repo, path, Some(metadata("v1", 100)));

    let workspace = hooked(&Store::Sqlite);
    let config = std::fs::read_to_string(workspace.config()).unwrap();
    let label = format!(
        "\n[labels.hub]\nthreshold = 1\ncounts = \"none\"\nmetadata = \"{}\"\nprepare = {{ command = [\"true\"] }}\ntrainer = {{ command = [\"sh\", \"train.sh\"], timeout = \"2m\" }}\ngate = \"none\"\npoll_interval = \"60s\"\n",
        hub.metadata_url(repo, path)
    );
    let config = config.replacen(
        "\n[server.webhooks]",
        &format!("{label}\n[server.webhooks]"),
        1,
    );
    let config = format!(
        "{config}\n[hub]\nendpoint = \"{}\"\ntoken = \"{}\"\n",
        hub.uri(),
        hub.token()
    );
    std::fs::write(workspace.config(), config).unwrap();
    let app = spawn_in(&workspace).await;

    let answer = app.trigger(&["hub"]).await;
    let run_id = entry(&answer, "hub")["run_id"].as_str().unwrap().to_owned();
    let waiting = app.wait_stage(&run_id, &["awaiting_dataset", "done"]).await;
    assert_eq!(waiting["run"]["stage"], "awaiting_dataset", "{waiting}");
    // Let the first poll (at once) find nothing new: the next is a minute away.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(workspace.starts("hub"), 0);

    hub.publish(repo, path, metadata("v2", 200));
    let body = serde_json::json!({
        "event": {"action": "update", "scope": "repo.content"},
        "repo": {"type": "dataset", "name": repo, "id": "6366c0", "private": false,
                 "headSha": "575db8b7", "owner": {"id": "61d200"}},
        "updatedRefs": [{"ref": "refs/heads/main", "oldSha": "ce9a4674", "newSha": "575db8b7"}],
        "webhook": {"id": "6390e8", "version": 3}
    });
    let sent = Instant::now();
    let response = app
        .client
        .post(app.url("/v1/hooks/huggingface"))
        .header("X-Webhook-Secret", HF_SECRET)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    while workspace.starts("hub") == 0 {
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "the waiting label never reacted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let latency = sent.elapsed();
    assert!(
        latency < Duration::from_millis(200),
        "reaction latency {latency:?} (poll interval 60 s)"
    );
    let done = app.wait_stage(&run_id, &["done"]).await;
    assert_eq!(done["run"]["outcome"], "trained", "{done}");
    app.shutdown().await.unwrap();
}
