//! MLflow registry: a real `mlflow server` (RETRAIN_TEST_MLFLOW_URL, started
//! by scripts/start-services.sh) and wiremock for the quirks.

use std::collections::BTreeMap;

use retrain_adapters::http::HttpPolicy;
use retrain_adapters::mlflow::{
    MlflowAuth, MlflowRegistry, MlflowSettings, ReadyWait, RegistryMode,
};
use retrain_adapters::testing::routes::json_route;
use retrain_adapters::testing::services::{unique_name, MLFLOW_VAR};
use retrain_core::domain::{Candidate, Label, Lease, RunId};
use retrain_core::ports::{ModelRegistry, PortError, RegistryRollback};
use secrecy::SecretString;
use serde_json::{json, Value};
use wiremock::matchers::{body_partial_json, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::common::service_url;

fn settings(uri: &str, model: &str, mode: RegistryMode) -> MlflowSettings {
    MlflowSettings {
        tracking_uri: uri.to_owned(),
        model: model.to_owned(),
        alias: "production".into(),
        mode,
        auth: MlflowAuth::None,
        policy: HttpPolicy::fast_for_tests(),
    }
}

fn registry(uri: &str, model: &str, mode: RegistryMode) -> MlflowRegistry {
    MlflowRegistry::new(settings(uri, model, mode)).unwrap()
}

/// The registry of model `m` (alias mode) on a wiremock MLflow.
fn mocked_registry(server: &MockServer) -> MlflowRegistry {
    registry(&server.uri(), "m", RegistryMode::Alias)
}

/// The real `mlflow server`'s URL, a new experiment on it, and a model
/// name no other test uses; `None` (skipped) when it is not running.
async fn real_server(model_prefix: &str) -> Option<(String, Mlflow, String)> {
    let url = service_url(MLFLOW_VAR)?;
    let mlflow = Mlflow::new(&url).await;
    Some((url, mlflow, unique_name(model_prefix)))
}

/// Test-data helper talking to the MLflow REST API directly.
struct Mlflow {
    api: String,
    http: reqwest::Client,
    experiment_id: String,
}

impl Mlflow {
    async fn new(base: &str) -> Self {
        let api = format!("{}/api/2.0/mlflow", base.trim_end_matches('/'));
        let http = reqwest::Client::new();
        let created: Value = http
            .post(format!("{api}/experiments/create"))
            .json(&json!({"name": unique_name("retrain-it")}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let experiment_id = created["experiment_id"].as_str().unwrap().to_owned();
        Self {
            api,
            http,
            experiment_id,
        }
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

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        self.http
            .get(format!("{}/{path}", self.api))
            .query(query)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// A finished run with `metrics` (the value logged last wins).
    async fn run_with(&self, metrics: &[(&str, f64)]) -> String {
        let run = self
            .post(
                "runs/create",
                json!({"experiment_id": self.experiment_id, "start_time": 1}),
            )
            .await;
        let run_id = run["run"]["info"]["run_id"].as_str().unwrap().to_owned();
        for (step, (key, value)) in metrics.iter().enumerate() {
            // An older, worse value first: the adapter must read the latest.
            self.post(
                "runs/log-metric",
                json!({"run_id": run_id, "key": key, "value": 0.01, "timestamp": 1, "step": 0}),
            )
            .await;
            self.post(
                "runs/log-metric",
                json!({"run_id": run_id, "key": key, "value": value, "timestamp": 2, "step": step + 1}),
            )
            .await;
        }
        self.post(
            "runs/update",
            json!({"run_id": run_id, "status": "FINISHED", "end_time": 2}),
        )
        .await;
        run_id
    }

    /// A LoggedModel (`POST logged-models`) whose source run is `run_id`;
    /// `model_metrics` are logged to the run *linked to the model*
    /// (`log-metric` with `model_id`), so they show in `model.data.metrics`.
    async fn logged_model(&self, run_id: &str, model_metrics: &[(&str, f64)]) -> String {
        let created = self
            .post(
                "logged-models",
                json!({"experiment_id": self.experiment_id, "name": "model", "source_run_id": run_id}),
            )
            .await;
        let model_id = created["model"]["info"]["model_id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(model_id.starts_with("m-"), "{created}");
        for (key, value) in model_metrics {
            self.post(
                "runs/log-metric",
                json!({"run_id": run_id, "key": key, "value": value, "timestamp": 3, "step": 0, "model_id": model_id}),
            )
            .await;
        }
        model_id
    }

    async fn versions(&self, model: &str) -> Vec<Value> {
        let found = self
            .get(
                "model-versions/search",
                &[("filter", &format!("name='{model}'"))],
            )
            .await;
        found["model_versions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn version(&self, model: &str, version: &str) -> Value {
        self.get(
            "model-versions/get",
            &[("name", model), ("version", version)],
        )
        .await["model_version"]
            .clone()
    }
}

fn candidate(id: &str, metrics: &[(&str, f64)]) -> Candidate {
    Candidate {
        id: id.to_owned(),
        metrics: metrics.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
    }
}

fn tag<'a>(version: &'a Value, key: &str) -> Option<&'a str> {
    version["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .and_then(|t| t["value"].as_str())
}

#[tokio::test]
async fn real_server_alias_mode_full_flow() {
    let Some((url, mlflow, model)) = real_server("wms-unet").await else {
        return;
    };
    let registry = registry(&url, &model, RegistryMode::Alias);

    // No registered model at all: first model.
    assert_eq!(registry.production(None).await.unwrap(), None);

    // First promotion creates the model and sets the alias.
    let run_a = mlflow.run_with(&[("dice", 0.80), ("iou", 0.70)]).await;
    let retrain_a = RunId::generate();
    let first = registry
        .promote(candidate(&run_a, &[]), retrain_a.clone(), None)
        .await
        .unwrap();
    assert_eq!(first.version, "1");
    assert_eq!(first.previous, None);

    let production = registry.production(None).await.unwrap().unwrap();
    assert_eq!(production.version, "1");
    assert_eq!(production.candidate_id.as_deref(), Some(run_a.as_str()));
    assert_eq!(
        production.metrics,
        BTreeMap::from([("dice".into(), 0.80), ("iou".into(), 0.70)])
    );

    // Candidate metrics by run id.
    let run_b = mlflow.run_with(&[("dice", 0.85), ("iou", 0.75)]).await;
    let metrics = registry
        .candidate_metrics(run_b.clone(), None)
        .await
        .unwrap();
    assert_eq!(metrics["dice"], 0.85);

    // Second promotion moves the alias and archives the old version.
    let retrain_b = RunId::generate();
    let second = registry
        .promote(candidate(&run_b, &[]), retrain_b.clone(), None)
        .await
        .unwrap();
    assert_eq!(second.version, "2");
    assert_eq!(second.previous.as_deref(), Some("1"));
    let v2 = mlflow.version(&model, "2").await;
    assert_eq!(v2["aliases"], json!(["production"]));
    let v1 = mlflow.version(&model, "1").await;
    assert_eq!(tag(&v1, "retrain.archived"), Some("true"));
    assert_ne!(v1["aliases"], json!(["production"]), "{v1}");
    assert_eq!(
        registry.production(None).await.unwrap().unwrap().version,
        "2"
    );

    // Promoting the same retrain run again is a no-op returning the same version.
    let again = registry
        .promote(candidate(&run_b, &[]), retrain_b, None)
        .await
        .unwrap();
    assert_eq!(again, second);
    assert_eq!(mlflow.versions(&model).await.len(), 2, "no new version");
}

#[tokio::test]
async fn real_server_alias_not_set_and_missing_runs() {
    let Some((url, mlflow, model)) = real_server("no-alias").await else {
        return;
    };
    mlflow
        .post("registered-models/create", json!({"name": model}))
        .await;
    let registry = registry(&url, &model, RegistryMode::Alias);
    // The model exists but the alias is not set (400 INVALID_PARAMETER_VALUE).
    assert_eq!(registry.production(None).await.unwrap(), None);

    let err = registry
        .candidate_metrics("0123456789abcdef0123456789abcdef".into(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::NotFound(_)), "{err:?}");
    assert!(err.to_string().contains("0123456789abcdef0123456789abcdef"));
}

#[tokio::test]
async fn real_server_stage_mode() {
    let Some((url, mlflow, model)) = real_server("staged").await else {
        return;
    };
    let registry = registry(&url, &model, RegistryMode::Stage);
    assert_eq!(registry.production(None).await.unwrap(), None);

    let run_a = mlflow.run_with(&[("dice", 0.5)]).await;
    let first = registry
        .promote(candidate(&run_a, &[]), RunId::generate(), None)
        .await
        .unwrap();
    assert_eq!(
        (first.version.as_str(), first.previous.as_deref()),
        ("1", None)
    );
    // A model with versions but none in Production is `{}` too.
    let run_b = mlflow.run_with(&[("dice", 0.6)]).await;
    let retrain_b = RunId::generate();
    let second = registry
        .promote(candidate(&run_b, &[]), retrain_b.clone(), None)
        .await
        .unwrap();
    assert_eq!(second.version, "2");
    assert_eq!(second.previous.as_deref(), Some("1"));
    assert_eq!(
        mlflow.version(&model, "1").await["current_stage"],
        "Archived"
    );
    assert_eq!(
        mlflow.version(&model, "2").await["current_stage"],
        "Production"
    );
    let production = registry.production(None).await.unwrap().unwrap();
    assert_eq!(production.version, "2");
    assert_eq!(production.metrics["dice"], 0.6);

    let again = registry
        .promote(candidate(&run_b, &[]), retrain_b, None)
        .await
        .unwrap();
    assert_eq!(again, second);
    assert_eq!(mlflow.versions(&model).await.len(), 2);
}

#[tokio::test]
async fn real_server_tracking_uri_from_lease_public_ip() {
    let Some(url) = service_url(MLFLOW_VAR) else {
        return;
    };
    // http://127.0.0.1:PORT → http://{public_ip}:PORT, filled from the lease.
    let parsed = url::Url::parse(&url).unwrap();
    let templated = format!("http://{{public_ip}}:{}", parsed.port().unwrap());
    let registry = MlflowRegistry::new(settings(
        &templated,
        &unique_name("leased"),
        RegistryMode::Alias,
    ))
    .unwrap();
    let mut lease = test_lease();
    lease
        .attributes
        .insert("public_ip".into(), "127.0.0.1".into());
    assert_eq!(registry.production(Some(lease)).await.unwrap(), None);
    let err = registry.production(None).await.unwrap_err();
    assert!(matches!(err, PortError::Config(_)), "{err:?}");
}

fn test_lease() -> Lease {
    let now = chrono::Utc::now();
    Lease {
        id: "lease-1".into(),
        label: Label::new("segmentation").unwrap(),
        run_id: RunId::generate(),
        provider: "ec2".into(),
        resources: vec!["i-0abc".into()],
        region: Some("us-east-1".into()),
        acquired_at: now,
        max_until: now,
        attributes: BTreeMap::new(),
        released_at: None,
    }
}

// ---- wiremock: quirks ----

#[tokio::test]
async fn empty_object_answers_mean_no_production_model() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(
            "/api/2.0/mlflow/registered-models/get-latest-versions",
        ))
        .and(body_partial_json(
            json!({"name": "m", "stages": ["Production"]}),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .mount(&server)
        .await;
    json_route(
        "GET",
        "/api/2.0/mlflow/registered-models/alias",
        200,
        json!({}),
    )
    .mount(&server)
    .await;
    let staged = MlflowRegistry::new(settings(&server.uri(), "m", RegistryMode::Stage)).unwrap();
    assert_eq!(staged.production(None).await.unwrap(), None);
    let aliased = mocked_registry(&server);
    assert_eq!(aliased.production(None).await.unwrap(), None);
}

#[tokio::test]
async fn alias_not_set_400_is_no_production_but_other_400s_fail() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/2.0/mlflow/registered-models/alias"))
        .and(query_param("name", "m"))
        .and(query_param("alias", "production"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "error_code": "INVALID_PARAMETER_VALUE",
            "message": "Registered model alias production not found.",
        })))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/2.0/mlflow/registered-models/alias"))
        .and(query_param("name", "other"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "error_code": "INVALID_PARAMETER_VALUE",
            "message": "Something else is wrong",
        })))
        .mount(&server)
        .await;
    let registry = mocked_registry(&server);
    assert_eq!(registry.production(None).await.unwrap(), None);
    let other = MlflowRegistry::new(settings(&server.uri(), "other", RegistryMode::Alias)).unwrap();
    let err = other.production(None).await.unwrap_err();
    assert!(err.to_string().contains("`other`"), "{err}");
    assert!(err.to_string().contains("INVALID_PARAMETER_VALUE"), "{err}");
}

#[tokio::test]
async fn server_error_then_success_is_retried_and_nan_metrics_are_kept() {
    let server = MockServer::start().await;
    json_route(
        "GET",
        "/api/2.0/mlflow/runs/get",
        500,
        json!({
            "error_code": "INTERNAL_ERROR", "message": "database is locked"
        }),
    )
    .up_to_n_times(1)
    .mount(&server)
    .await;
    Mock::given(method("GET"))
        .and(path("/api/2.0/mlflow/runs/get"))
        .and(query_param("run_id", "abc"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "run": {"info": {"run_id": "abc"}, "data": {"metrics": [
                {"key": "dice", "value": 0.9, "timestamp": 1, "step": 0},
                {"key": "iou", "value": "NaN", "timestamp": 1, "step": 0}
            ]}, "inputs": {}, "outputs": {}}
        })))
        .mount(&server)
        .await;
    let registry = mocked_registry(&server);
    let metrics = registry
        .candidate_metrics("abc".into(), None)
        .await
        .unwrap();
    assert_eq!(metrics["dice"], 0.9);
    // NaN is passed on: the gate rejects it with a reason naming the metric.
    assert!(metrics["iou"].is_nan());
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn run_without_metrics_has_empty_data() {
    let server = MockServer::start().await;
    json_route(
        "GET",
        "/api/2.0/mlflow/runs/get",
        200,
        json!({
            "run": {"info": {"run_id": "abc"}, "data": {}}
        }),
    )
    .mount(&server)
    .await;
    let registry = mocked_registry(&server);
    assert!(registry
        .candidate_metrics("abc".into(), None)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn token_is_sent_but_never_shown() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/2.0/mlflow/runs/get"))
        .and(wiremock::matchers::header(
            "authorization",
            "Bearer s3cr3t-token",
        ))
        .respond_with(ResponseTemplate::new(403).set_body_string("denied"))
        .mount(&server)
        .await;
    let mut s = settings(&server.uri(), "m", RegistryMode::Alias);
    s.auth = MlflowAuth::Token(SecretString::from("s3cr3t-token"));
    let registry = MlflowRegistry::new(s).unwrap();
    assert!(!format!("{registry:?}").contains("s3cr3t"));
    let err = registry
        .candidate_metrics("abc".into(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::Denied(_)), "{err:?}");
    assert!(!err.to_string().contains("s3cr3t"));
    assert!(!format!("{err:?}").contains("s3cr3t"));
}

#[tokio::test]
async fn create_version_500_is_not_blindly_retried() {
    // The first create answers 500 but the version was in fact created: the
    // adapter must find it by its tag instead of creating a second one.
    let server = MockServer::start().await;
    let base = "/api/2.0/mlflow";
    let run_id = RunId("run-77".into());
    json_route(
        "GET",
        format!("{base}/model-versions/search"),
        200,
        json!({}),
    )
    .up_to_n_times(1)
    .mount(&server)
    .await;
    json_route("GET", format!("{base}/model-versions/search"), 200, json!({"model_versions": [
            {"name": "m", "version": "4", "creation_timestamp": 1795369921052_i64, "last_updated_timestamp": 1795369921052_i64,
             "current_stage": "None", "description": "promoted by retrain run run-77", "source": "runs:/cand/model",
             "run_id": "cand", "status": "READY", "tags": [{"key": "retrain_run_id", "value": "run-77"}], "run_link": ""}
        ]}))
        .mount(&server)
        .await;
    let answer = json!({
        "error_code": "RESOURCE_ALREADY_EXISTS", "message": "Registered Model (name=m) already exists."
    });
    json_route(
        "POST",
        format!("{base}/registered-models/create"),
        400,
        answer,
    )
    .mount(&server)
    .await;
    json_route(
        "POST",
        format!("{base}/model-versions/create"),
        500,
        json!({
            "error_code": "INTERNAL_ERROR", "message": "lost"
        }),
    )
    .mount(&server)
    .await;
    json_route(
        "GET",
        format!("{base}/registered-models/alias"),
        200,
        json!({"model_version": {"name": "m", "version": "3", "creation_timestamp": 1795369921052_i64,
                "last_updated_timestamp": 1795369921052_i64, "current_stage": "None", "description": "",
                "source": "runs:/old/model", "run_id": "old", "status": "READY", "run_link": "",
                "aliases": ["production"]}}),
    )
    .mount(&server)
    .await;
    expect_alias_moved_to(&server, "4").await;
    json_route(
        "POST",
        format!("{base}/model-versions/set-tag"),
        200,
        json!({}),
    )
    .mount(&server)
    .await;
    let registry = mocked_registry(&server);
    let promoted = registry
        .promote(candidate("cand", &[]), run_id, None)
        .await
        .unwrap();
    assert_eq!(promoted.version, "4");
    assert_eq!(promoted.previous.as_deref(), Some("3"));
    let creates = server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.url.path().ends_with("model-versions/create"))
        .count();
    assert_eq!(
        creates, 1,
        "the create call is not retried once the version exists"
    );
}

// ---- MLflow 3 LoggedModel candidates and the READY wait ----

fn fast_ready() -> ReadyWait {
    ReadyWait {
        timeout: std::time::Duration::from_secs(3),
        poll_interval: std::time::Duration::from_millis(20),
        max_poll_interval: std::time::Duration::from_millis(100),
    }
}

const MODEL_ID: &str = "m-e6dd905da2f644c7896cc1fe2dbd35ca";
const SOURCE_RUN: &str = "9f6c17f79cda43c6bed22b82327861ee";

/// `GET logged-models/{id}` exactly as mlflow 3.17 answers it.
fn logged_model_json(metrics: Value) -> Value {
    let mut model = json!({
        "model": {
            "info": {
                "model_id": MODEL_ID,
                "experiment_id": "1",
                "name": "model",
                "creation_timestamp_ms": 1796194606294_i64,
                "last_updated_timestamp_ms": 1796194606294_i64,
                "artifact_uri": format!("mlflow-artifacts:/1/models/{MODEL_ID}/artifacts"),
                "status": "LOGGED_MODEL_READY",
                "model_type": "",
                "source_run_id": SOURCE_RUN
            },
            "data": {}
        }
    });
    if !metrics.is_null() {
        model["model"]["data"]["metrics"] = metrics;
    }
    model
}

/// A model version as `model-versions/create|get` return it.
fn version_json(version: &str, status: &str, status_message: Option<&str>) -> Value {
    let mut v = json!({"model_version": {
        "name": "m", "version": version,
        "creation_timestamp": 1796194610242_i64, "last_updated_timestamp": 1796194610242_i64,
        "current_stage": "None", "description": "promoted by retrain run run-9",
        "source": format!("models:/{MODEL_ID}"), "run_id": SOURCE_RUN,
        "status": status, "run_link": "",
        "tags": [{"key": "retrain_run_id", "value": "run-9"}]
    }});
    if let Some(message) = status_message {
        v["model_version"]["status_message"] = json!(message);
    }
    v
}

#[tokio::test]
async fn logged_model_candidate_metrics_come_from_the_logged_model() {
    let server = MockServer::start().await;
    let metrics = json!([
        {"key": "dice", "value": 0.7, "timestamp": 1, "step": 0, "model_id": MODEL_ID, "run_id": SOURCE_RUN},
        {"key": "dice", "value": 0.9, "timestamp": 2, "step": 1, "model_id": MODEL_ID, "run_id": SOURCE_RUN,
         "dataset_name": "val", "dataset_digest": "abc123"},
        {"key": "iou", "value": "NaN", "timestamp": 2, "step": 1, "model_id": MODEL_ID, "run_id": SOURCE_RUN}
    ]);
    json_route(
        "GET",
        format!("/api/2.0/mlflow/logged-models/{MODEL_ID}"),
        200,
        logged_model_json(metrics),
    )
    .mount(&server)
    .await;
    let registry = mocked_registry(&server);
    for id in [MODEL_ID.to_owned(), format!("models:/{MODEL_ID}")] {
        let metrics = registry.candidate_metrics(id, None).await.unwrap();
        assert_eq!(metrics["dice"], 0.9);
        assert!(metrics["iou"].is_nan());
    }
    // No run was read: the logged model's own metrics were there.
    let requests = server.received_requests().await.unwrap();
    assert!(requests
        .iter()
        .all(|r| r.url.path().contains("/logged-models/")));
}

#[tokio::test]
async fn logged_model_without_metrics_falls_back_to_its_source_run() {
    let server = MockServer::start().await;
    json_route(
        "GET",
        format!("/api/2.0/mlflow/logged-models/{MODEL_ID}"),
        200,
        logged_model_json(Value::Null),
    )
    .mount(&server)
    .await;
    Mock::given(method("GET"))
        .and(path("/api/2.0/mlflow/runs/get"))
        .and(query_param("run_id", SOURCE_RUN))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "run": {"info": {"run_id": SOURCE_RUN, "run_uuid": SOURCE_RUN, "experiment_id": "1", "status": "FINISHED"},
                    "data": {"metrics": [{"key": "dice", "value": 0.81, "timestamp": 1, "step": 0}]},
                    "inputs": {}, "outputs": {}}
        })))
        .expect(1)
        .mount(&server)
        .await;
    json_route(
        "GET",
        "/api/2.0/mlflow/logged-models/m-0000000000000000000000000000dead",
        404,
        json!({
            "error_code": "RESOURCE_DOES_NOT_EXIST",
            "message": "Logged model with ID 'm-0000000000000000000000000000dead' not found.",
            "sqlstate": "KAM00", "error_class": "RESOURCE_NOT_FOUND"
        }),
    )
    .mount(&server)
    .await;
    let registry = mocked_registry(&server);
    let metrics = registry
        .candidate_metrics(MODEL_ID.into(), None)
        .await
        .unwrap();
    assert_eq!(metrics, BTreeMap::from([("dice".into(), 0.81)]));
    let err = registry
        .candidate_metrics("m-0000000000000000000000000000dead".into(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::NotFound(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("m-0000000000000000000000000000dead"),
        "{err}"
    );
}

/// The mocks every LoggedModel promotion needs: no version of the run yet,
/// the registered model exists, no production alias.
async fn mount_promotion_basics(server: &MockServer) {
    let base = "/api/2.0/mlflow";
    json_route(
        "GET",
        format!("{base}/model-versions/search"),
        200,
        json!({}),
    )
    .mount(server)
    .await;
    let answer = json!({
        "error_code": "RESOURCE_ALREADY_EXISTS", "message": "Registered Model (name=m) already exists.",
        "sqlstate": "KAM00", "error_class": "RESOURCE_ALREADY_EXISTS"
    });
    json_route(
        "POST",
        format!("{base}/registered-models/create"),
        400,
        answer,
    )
    .mount(server)
    .await;
    let answer = json!({
        "error_code": "INVALID_PARAMETER_VALUE", "message": "Registered model alias production not found.",
        "sqlstate": "KAM00", "error_class": "INVALID_PARAMETER_VALUE"
    });
    json_route(
        "GET",
        format!("{base}/registered-models/alias"),
        400,
        answer,
    )
    .mount(server)
    .await;
    json_route(
        "POST",
        format!("{base}/model-versions/set-tag"),
        200,
        json!({}),
    )
    .mount(server)
    .await;
    // Registered from the logged model: models:/ source and model_id.
    Mock::given(method("POST"))
        .and(path(format!("{base}/model-versions/create")))
        .and(body_partial_json(json!({
            "name": "m",
            "source": format!("models:/{MODEL_ID}"),
            "model_id": MODEL_ID,
            "tags": [{"key": "retrain_run_id", "value": "run-9"}]
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(version_json(
            "5",
            "PENDING_REGISTRATION",
            None,
        )))
        .expect(1)
        .mount(server)
        .await;
}

/// Expects the production alias of `m` to be moved to `version` once.
async fn expect_alias_moved_to(server: &MockServer, version: &str) {
    Mock::given(method("POST"))
        .and(path("/api/2.0/mlflow/registered-models/alias"))
        .and(body_partial_json(
            json!({"name": "m", "alias": "production", "version": version}),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .expect(1)
        .mount(server)
        .await;
}

/// A wiremock MLflow where the promoted version stays `version` (never
/// READY): the alias must never move.
async fn registration_stuck_at(version: Value) -> MockServer {
    let server = MockServer::start().await;
    mount_promotion_basics(&server).await;
    let base = "/api/2.0/mlflow";
    json_route("GET", format!("{base}/model-versions/get"), 200, version)
        .mount(&server)
        .await;
    json_route(
        "POST",
        format!("{base}/registered-models/alias"),
        200,
        json!({}),
    )
    .expect(0)
    .mount(&server)
    .await;
    server
}

fn paths(requests: &[wiremock::Request]) -> Vec<String> {
    requests
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r.method,
                r.url.path().trim_start_matches("/api/2.0/mlflow/")
            )
        })
        .collect()
}

#[tokio::test]
async fn promote_logged_model_waits_until_ready_before_moving_the_alias() {
    let server = MockServer::start().await;
    mount_promotion_basics(&server).await;
    let base = "/api/2.0/mlflow";
    Mock::given(method("GET"))
        .and(path(format!("{base}/model-versions/get")))
        .and(query_param("name", "m"))
        .and(query_param("version", "5"))
        .respond_with(ResponseTemplate::new(200).set_body_json(version_json(
            "5",
            "PENDING_REGISTRATION",
            None,
        )))
        .up_to_n_times(2)
        .mount(&server)
        .await;
    json_route(
        "GET",
        format!("{base}/model-versions/get"),
        200,
        version_json("5", "READY", None),
    )
    .mount(&server)
    .await;
    expect_alias_moved_to(&server, "5").await;
    let registry = mocked_registry(&server).with_ready_wait(fast_ready());
    let promoted = registry
        .promote(candidate(MODEL_ID, &[]), RunId("run-9".into()), None)
        .await
        .unwrap();
    assert_eq!(promoted.version, "5");
    assert_eq!(promoted.previous, None);
    let order = paths(&server.received_requests().await.unwrap());
    let gets: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|(_, p)| *p == "GET model-versions/get")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(gets.len(), 3, "PENDING, PENDING, READY: {order:#?}");
    let alias = order
        .iter()
        .position(|p| p == "POST registered-models/alias")
        .unwrap();
    assert!(alias > gets[2], "alias moved only after READY: {order:#?}");
}

#[tokio::test]
async fn failed_registration_fails_the_promotion_with_mlflows_message() {
    let server = registration_stuck_at(version_json(
        "5",
        "FAILED_REGISTRATION",
        Some("Failed to copy model artifacts: permission denied on s3://models/m-e6dd"),
    ))
    .await;
    let registry = mocked_registry(&server).with_ready_wait(fast_ready());
    let err = registry
        .promote(candidate(MODEL_ID, &[]), RunId("run-9".into()), None)
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("FAILED_REGISTRATION"), "{text}");
    assert!(text.contains("version 5"), "{text}");
    assert!(
        text.contains("Failed to copy model artifacts: permission denied"),
        "{text}"
    );
}

#[tokio::test]
async fn pending_registration_is_waited_for_a_bounded_time() {
    let server = registration_stuck_at(version_json("5", "PENDING_REGISTRATION", None)).await;
    let registry = mocked_registry(&server).with_ready_wait(ReadyWait {
        timeout: std::time::Duration::from_millis(300),
        ..fast_ready()
    });
    let started = std::time::Instant::now();
    let err = registry
        .promote(candidate(MODEL_ID, &[]), RunId("run-9".into()), None)
        .await
        .unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    assert!(matches!(err, PortError::Transient(_)), "{err:?}");
    assert!(
        err.to_string().contains("still PENDING_REGISTRATION"),
        "{err}"
    );
}

#[tokio::test]
async fn real_server_promotes_a_logged_model_by_its_id() {
    let Some((url, mlflow, model)) = real_server("logged").await else {
        return;
    };
    let registry = registry(&url, &model, RegistryMode::Alias).with_ready_wait(fast_ready());

    // The run's own metrics differ from the ones linked to the model: the
    // candidate must be measured by the model's.
    let run = mlflow.run_with(&[("dice", 0.10)]).await;
    let model_id = mlflow
        .logged_model(&run, &[("dice", 0.91), ("iou", 0.77)])
        .await;
    let metrics = registry
        .candidate_metrics(model_id.clone(), None)
        .await
        .unwrap();
    assert_eq!(
        metrics,
        BTreeMap::from([("dice".into(), 0.91), ("iou".into(), 0.77)])
    );

    let retrain = RunId::generate();
    let promoted = registry
        .promote(candidate(&model_id, &[]), retrain.clone(), None)
        .await
        .unwrap();
    assert_eq!(
        (promoted.version.as_str(), promoted.previous.as_deref()),
        ("1", None)
    );
    let v1 = mlflow.version(&model, "1").await;
    assert_eq!(v1["source"], json!(format!("models:/{model_id}")), "{v1}");
    assert_eq!(
        v1["run_id"],
        json!(run),
        "the server links the source run: {v1}"
    );
    assert_eq!(v1["status"], "READY");
    assert_eq!(v1["aliases"], json!(["production"]));
    assert_eq!(tag(&v1, "retrain_run_id"), Some(retrain.as_str()));

    // Production is measured like the candidate was.
    let production = registry.production(None).await.unwrap().unwrap();
    assert_eq!(production.version, "1");
    assert_eq!(production.candidate_id.as_deref(), Some(model_id.as_str()));
    assert_eq!(production.metrics["dice"], 0.91);

    // Idempotent per retrain run id.
    let again = registry
        .promote(candidate(&model_id, &[]), retrain, None)
        .await
        .unwrap();
    assert_eq!(again, promoted);
    assert_eq!(mlflow.versions(&model).await.len(), 1);

    // A logged model with no metrics of its own: its source run's.
    let run_c = mlflow.run_with(&[("dice", 0.66)]).await;
    let bare = mlflow.logged_model(&run_c, &[]).await;
    let metrics = registry.candidate_metrics(bare, None).await.unwrap();
    assert_eq!(metrics, BTreeMap::from([("dice".into(), 0.66)]));

    // An unknown logged model is NotFound naming it.
    let err = registry
        .candidate_metrics("m-0123456789abcdef0123456789abcdef".into(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::NotFound(_)), "{err:?}");
    assert!(err
        .to_string()
        .contains("m-0123456789abcdef0123456789abcdef"));

    // A second, run-based promotion replaces it (mixed candidates).
    let run_b = mlflow.run_with(&[("dice", 0.95)]).await;
    let second = registry
        .promote(candidate(&run_b, &[]), RunId::generate(), None)
        .await
        .unwrap();
    assert_eq!(second.previous.as_deref(), Some("1"));
    let production = registry.production(None).await.unwrap().unwrap();
    assert_eq!(production.candidate_id.as_deref(), Some(run_b.as_str()));
}

fn rollback_order(version: &str, run_id: &RunId) -> RegistryRollback {
    RegistryRollback {
        version: version.into(),
        run_id: run_id.clone(),
        by: "alice".into(),
        reason: "dice regressed in production".into(),
    }
}

/// Two promotions (versions 1 and 2) of fresh runs of `mlflow`.
async fn promoted_twice(mlflow: &Mlflow, registry: &MlflowRegistry) {
    for dice in [0.80, 0.85] {
        let run = mlflow.run_with(&[("dice", dice)]).await;
        registry
            .promote(candidate(&run, &[]), RunId::generate(), None)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn real_server_alias_mode_rollback_moves_the_alias_back_and_tags_the_version() {
    let Some((url, mlflow, model)) = real_server("rolled").await else {
        return;
    };
    let registry = registry(&url, &model, RegistryMode::Alias);
    assert!(
        !registry.version_exists("1".into(), None).await.unwrap(),
        "no model yet"
    );
    promoted_twice(&mlflow, &registry).await;
    assert_eq!(
        mlflow.version(&model, "2").await["aliases"],
        json!(["production"])
    );
    assert!(registry.version_exists("1".into(), None).await.unwrap());
    assert!(!registry.version_exists("99".into(), None).await.unwrap());

    let rollback_run = RunId::generate();
    let back = registry
        .roll_back(rollback_order("1", &rollback_run), None)
        .await
        .unwrap();
    assert_eq!(back.version, "1");
    assert_eq!(back.previous.as_deref(), Some("2"));
    let v1 = mlflow.version(&model, "1").await;
    assert_eq!(v1["aliases"], json!(["production"]), "{v1}");
    assert_eq!(tag(&v1, "retrain.archived"), Some("false"));
    assert_eq!(tag(&v1, "retrain.restored"), Some(rollback_run.as_str()));
    let v2 = mlflow.version(&model, "2").await;
    assert_ne!(v2["aliases"], json!(["production"]), "{v2}");
    assert_eq!(tag(&v2, "retrain.rolled_back_by"), Some("alice"));
    assert_eq!(
        tag(&v2, "retrain.rolled_back_reason"),
        Some("dice regressed in production")
    );
    assert_eq!(
        tag(&v2, "retrain.rolled_back_run_id"),
        Some(rollback_run.as_str())
    );
    assert_eq!(tag(&v2, "retrain.archived"), Some("true"));
    let production = registry.production(None).await.unwrap().unwrap();
    assert_eq!(
        (production.version.as_str(), production.metrics["dice"]),
        ("1", 0.80)
    );

    // The same rollback run again changes nothing and answers the same.
    let again = registry
        .roll_back(rollback_order("1", &rollback_run), None)
        .await
        .unwrap();
    assert_eq!(again, back);
    assert_eq!(mlflow.versions(&model).await.len(), 2, "no new version");

    let err = registry
        .roll_back(rollback_order("99", &RunId::generate()), None)
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::NotFound(_)), "{err:?}");
    assert!(err.to_string().contains("version 99"), "{err}");
}

#[tokio::test]
async fn real_server_rollback_interrupted_before_the_alias_moved_completes_once() {
    let Some((url, mlflow, model)) = real_server("rolled-crash").await else {
        return;
    };
    let registry = registry(&url, &model, RegistryMode::Alias);
    promoted_twice(&mlflow, &registry).await;
    // An earlier attempt of this rollback run recorded its intent on
    // version 1, then died before moving the alias.
    let rollback_run = RunId::generate();
    for (key, value) in [
        ("retrain.restored_from", "2"),
        ("retrain.restored_by_run_id", rollback_run.as_str()),
    ] {
        mlflow
            .post(
                "model-versions/set-tag",
                json!({"name": model, "version": "1", "key": key, "value": value}),
            )
            .await;
    }
    let back = registry
        .roll_back(rollback_order("1", &rollback_run), None)
        .await
        .unwrap();
    assert_eq!(
        (back.version.as_str(), back.previous.as_deref()),
        ("1", Some("2"))
    );
    assert_eq!(
        mlflow.version(&model, "1").await["aliases"],
        json!(["production"])
    );
    assert_eq!(
        tag(&mlflow.version(&model, "2").await, "retrain.rolled_back_by"),
        Some("alice")
    );
}

#[tokio::test]
async fn real_server_stage_mode_rollback_transitions_back_and_archives() {
    let Some((url, mlflow, model)) = real_server("staged-rolled").await else {
        return;
    };
    let registry = registry(&url, &model, RegistryMode::Stage);
    promoted_twice(&mlflow, &registry).await;
    assert_eq!(
        mlflow.version(&model, "1").await["current_stage"],
        "Archived"
    );

    let rollback_run = RunId::generate();
    let back = registry
        .roll_back(rollback_order("1", &rollback_run), None)
        .await
        .unwrap();
    assert_eq!(
        (back.version.as_str(), back.previous.as_deref()),
        ("1", Some("2"))
    );
    assert_eq!(
        mlflow.version(&model, "1").await["current_stage"],
        "Production"
    );
    let v2 = mlflow.version(&model, "2").await;
    assert_eq!(v2["current_stage"], "Archived");
    assert_eq!(tag(&v2, "retrain.rolled_back_by"), Some("alice"));
    assert_eq!(
        tag(&v2, "retrain.rolled_back_reason"),
        Some("dice regressed in production")
    );
    assert_eq!(
        registry.production(None).await.unwrap().unwrap().version,
        "1"
    );
    let again = registry
        .roll_back(rollback_order("1", &rollback_run), None)
        .await
        .unwrap();
    assert_eq!(again, back);
}

/// A version registered outside retrain (announced by an MLflow webhook) is
/// named `models:/<model>/<N>`: measured by its run, and promoted as is
/// (the alias moves to *that* version; no copy is registered), once per
/// retrain run.
#[tokio::test]
async fn real_server_promotes_an_already_registered_version_itself() {
    let Some((url, mlflow, model)) = real_server("registered").await else {
        return;
    };
    let registry = registry(&url, &model, RegistryMode::Alias);
    let run_a = mlflow.run_with(&[("dice", 0.80)]).await;
    registry
        .promote(candidate(&run_a, &[]), RunId::generate(), None)
        .await
        .unwrap();

    // Someone registers version 2 from a better run.
    let run_b = mlflow.run_with(&[("dice", 0.90)]).await;
    mlflow
        .post(
            "model-versions/create",
            json!({"name": model, "source": format!("runs:/{run_b}/model"), "run_id": run_b}),
        )
        .await;
    let id = format!("models:/{model}/2");
    let metrics = registry.candidate_metrics(id.clone(), None).await.unwrap();
    assert_eq!(metrics["dice"], 0.90);

    let retrain_run = RunId::generate();
    let promoted = registry
        .promote(candidate(&id, &[]), retrain_run.clone(), None)
        .await
        .unwrap();
    assert_eq!(promoted.version, "2");
    assert_eq!(promoted.previous.as_deref(), Some("1"));
    assert_eq!(
        mlflow.version(&model, "2").await["aliases"],
        json!(["production"])
    );
    assert_eq!(mlflow.versions(&model).await.len(), 2, "no copy registered");
    let again = registry
        .promote(candidate(&id, &[]), retrain_run, None)
        .await
        .unwrap();
    assert_eq!(again, promoted);
    assert_eq!(mlflow.versions(&model).await.len(), 2);

    // A version of another model, or not a number, is not taken for one.
    let other = registry
        .candidate_metrics(format!("models:/{model}-other/2"), None)
        .await;
    assert!(other.is_err(), "{other:?}");
}
