//! Hugging Face Hub adapters against wiremock, with the shapes of
//! `shared/reference/external-apis.md` §1, and the stateful fake Hub.

use std::time::{Duration, Instant};

use retrain_adapters::hf::{
    HfMetadataStore, HfSpaceController, HfSpaceTrainer, HubClient, HubSettings, HANDLE_KIND,
};
use retrain_adapters::http::HttpPolicy;
use retrain_adapters::testing::routes::{calls, json_route, status_route};
use retrain_core::domain::{
    JobKey, Label, RunId, SpaceStage, TrainingHandle, TrainingOutcome, VersionTag,
};
use retrain_core::ports::{
    MetadataRead, MetadataStore, PortError, SpaceController, Trainer, TrainingRequest,
};
use secrecy::SecretString;
use serde_json::json;
use wiremock::matchers::{body_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

const TOKEN: &str = "hf_test_secret_token_do_not_leak";
const META_PATH: &str = "/datasets/owner/ds/resolve/main/dataset_metadata.json";

fn settings(server: &MockServer) -> HubSettings {
    HubSettings {
        endpoint: url::Url::parse(&server.uri()).unwrap(),
        token: Some(SecretString::from(TOKEN)),
        policy: HttpPolicy::fast_for_tests(),
    }
}

fn client(server: &MockServer) -> HubClient {
    HubClient::new(settings(server)).unwrap()
}

fn bearer() -> wiremock::matchers::HeaderExactMatcher {
    header("authorization", format!("Bearer {TOKEN}").as_str())
}

fn metadata_json(version: &str, num_samples: u64) -> serde_json::Value {
    json!({
        "dataset_name": "owner/ds",
        "version_tag": version,
        "num_samples": num_samples,
        "splits": {"train": 80, "eval": 10, "test": 10},
        "created_at": "2025-10-30T11:53:01.110260+00:00"
    })
}

fn request(version: &str) -> TrainingRequest {
    TrainingRequest {
        label: Label::new("department").unwrap(),
        run_id: RunId("run-1".into()),
        attempt: 1,
        job_key: JobKey("run-1/train/1".into()),
        dataset_name: "owner/ds".into(),
        dataset_version: VersionTag::new(version),
        lease: None,
        first_start: false,
    }
}

fn store(server: &MockServer) -> HfMetadataStore {
    HfMetadataStore::from_url(client(server), &format!("{}{META_PATH}", server.uri())).unwrap()
}

/// Every error message must name `needle` and never contain the token.
fn check_message(error: &PortError, needle: &str) {
    let message = error.to_string();
    assert!(message.contains(needle), "{message:?} should name {needle}");
    assert!(!message.contains(TOKEN), "token leaked: {message:?}");
}

fn runtime(stage: &str) -> serde_json::Value {
    json!({"stage": stage, "hardware": {"current": null, "requested": "cpu-basic"},
           "storage": null, "gcTimeout": 172800, "replicas": {"requested": 1}, "devMode": false,
           "domains": [{"domain": "owner-prep.hf.space", "stage": "READY"}]})
}

#[test]
fn debug_output_never_shows_the_token() {
    let settings = HubSettings {
        token: Some(SecretString::from(TOKEN)),
        ..HubSettings::default()
    };
    assert!(!format!("{settings:?}").contains(TOKEN));
    let client = HubClient::new(settings).unwrap();
    assert!(!format!("{client:?}").contains(TOKEN));
    let controller = HfSpaceController::new(client.clone(), "owner/prep", false).unwrap();
    assert!(!format!("{controller:?}").contains(TOKEN));
    let store = HfMetadataStore::from_url(client, "hf://datasets/owner/ds/m.json").unwrap();
    assert!(!format!("{store:?}").contains(TOKEN));
}

/// The prepare Space `owner/prep` (no factory reboot) through `server`.
fn prep(server: &MockServer) -> HfSpaceController {
    HfSpaceController::new(client(server), "owner/prep", false).unwrap()
}

/// Restarts `owner/prep` for one job, which must succeed: the calls it made.
async fn restart_prep(server: &MockServer) -> Vec<String> {
    prep(server)
        .restart(&JobKey("cycle-1/prepare/job".into()))
        .await
        .unwrap();
    calls(server).await
}

#[tokio::test]
async fn restart_posts_without_factory_by_default() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/spaces/owner/prep/restart"))
        .and(bearer())
        .respond_with(ResponseTemplate::new(200).set_body_json(runtime("BUILDING")))
        .expect(1)
        .mount(&server)
        .await;
    let controller =
        HfSpaceController::new(client(&server), "hf-space://owner/prep", false).unwrap();
    controller
        .restart(&JobKey("cycle-1/prepare/job".into()))
        .await
        .unwrap();
    let requests = server.received_requests().await.unwrap();
    assert_eq!(
        requests[0].url.query(),
        None,
        "no factory=true unless asked"
    );
    assert_eq!(controller.describe(), "hf-space://owner/prep");
}

#[tokio::test]
async fn restart_with_factory_reboot_sends_factory_true() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/spaces/owner/prep/restart"))
        .and(query_param("factory", "true"))
        .and(bearer())
        .respond_with(ResponseTemplate::new(200).set_body_json(runtime("BUILDING")))
        .expect(1)
        .mount(&server)
        .await;
    let controller = HfSpaceController::new(
        client(&server),
        "https://huggingface.co/spaces/owner/prep",
        true,
    )
    .unwrap();
    controller
        .restart(&JobKey("cycle-1/prepare/job".into()))
        .await
        .unwrap();
}

#[tokio::test]
async fn runtime_stages_are_mapped_including_unknown_and_errors() {
    let server = MockServer::start().await;
    let cases = [
        (runtime("RUNNING"), SpaceStage::Running),
        (runtime("RUNNING_BUILDING"), SpaceStage::Building),
        (runtime("APP_STARTING"), SpaceStage::Starting),
        (runtime("PAUSED"), SpaceStage::Paused),
        (runtime("SLEEPING"), SpaceStage::Sleeping),
        (
            runtime("SOMETHING_NEW"),
            SpaceStage::Unknown("SOMETHING_NEW".into()),
        ),
        (
            json!({"stage": "BUILD_ERROR", "errorMessage": "pip failed"}),
            SpaceStage::Error("BUILD_ERROR".into()),
        ),
        (
            json!({"stage": "RUNTIME_ERROR", "errorMessage": "exit code 1"}),
            SpaceStage::Error("RUNTIME_ERROR".into()),
        ),
        (
            json!({"stage": "NO_APP_FILE"}),
            SpaceStage::Error("NO_APP_FILE".into()),
        ),
    ];
    let controller = prep(&server);
    for (body, expected) in cases {
        server.reset().await;
        Mock::given(method("GET"))
            .and(path("/api/spaces/owner/prep/runtime"))
            .and(bearer())
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
            .mount(&server)
            .await;
        assert_eq!(controller.stage().await.unwrap(), expected);
    }
}

#[tokio::test]
async fn runtime_without_stage_is_an_invalid_response_naming_the_field() {
    let server = MockServer::start().await;
    let controller = prep(&server);
    for body in [
        ResponseTemplate::new(200).set_body_json(json!({"hardware": {}})),
        ResponseTemplate::new(200).set_body_json(json!({"stage": 3})),
        ResponseTemplate::new(200).set_body_string("<html>"),
    ] {
        server.reset().await;
        Mock::given(method("GET"))
            .respond_with(body)
            .mount(&server)
            .await;
        let err = controller.stage().await.unwrap_err();
        assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
        check_message(&err, "owner/prep");
    }
    server.reset().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"hardware": {}})))
        .mount(&server)
        .await;
    check_message(&controller.stage().await.unwrap_err(), "`stage`");
}

#[tokio::test]
async fn space_permission_errors_name_the_space_and_permission() {
    let server = MockServer::start().await;
    let controller = prep(&server);
    for status in [401, 403] {
        server.reset().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(status)
                    .set_body_json(json!({"error": "You must be the owner"})),
            )
            .mount(&server)
            .await;
        let err = controller
            .restart(&JobKey("cycle-1/prepare/job".into()))
            .await
            .unwrap_err();
        assert!(matches!(err, PortError::Denied(_)), "{err:?}");
        check_message(&err, "owner/prep");
        check_message(&err, "write access");
        // Not retried: permission errors fail at once.
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }
    server.reset().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(404)
                .insert_header("x-error-code", "RepoNotFound")
                .set_body_json(json!({"error": "Repository not found"})),
        )
        .mount(&server)
        .await;
    let err = controller
        .restart(&JobKey("cycle-1/prepare/job".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::NotFound(_)), "{err:?}");
    check_message(&err, "owner/prep");
    check_message(&err, "RepoNotFound");
}

#[tokio::test]
async fn restart_of_a_static_space_fails_with_a_hint() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"error": "Cannot restart a static space"})),
        )
        .mount(&server)
        .await;
    let controller = prep(&server);
    let err = controller
        .restart(&JobKey("cycle-1/prepare/job".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    check_message(&err, "owner/prep");
    check_message(&err, "Cannot restart a static space");
    check_message(&err, "static Spaces");
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_server_echoing_the_token_cannot_leak_it_into_errors() {
    let server = MockServer::start().await;
    let echo = format!("bad header: Bearer {TOKEN}");
    let controller = prep(&server);
    for status in [400, 401, 403, 404, 409, 503] {
        server.reset().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(status)
                    .insert_header("x-error-message", echo.as_str())
                    .set_body_string(echo.clone()),
            )
            .mount(&server)
            .await;
        let err = controller
            .restart(&JobKey("cycle-1/prepare/job".into()))
            .await
            .unwrap_err();
        check_message(&err, "owner/prep");
        assert!(err.to_string().contains("Bearer ***"), "{err}");
    }
}

#[tokio::test]
async fn retries_5xx_then_succeeds() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(502))
        .up_to_n_times(2)
        .mount(&server)
        .await;
    json_route(
        "GET",
        "/api/spaces/owner/prep/runtime",
        200,
        runtime("RUNNING"),
    )
    .mount(&server)
    .await;
    let controller = prep(&server);
    assert_eq!(controller.stage().await.unwrap(), SpaceStage::Running);
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
}

#[tokio::test]
async fn persistent_5xx_is_transient_naming_the_space() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let controller = prep(&server);
    let err = controller.stage().await.unwrap_err();
    assert!(matches!(err, PortError::Transient(_)), "{err:?}");
    check_message(&err, "owner/prep");
    // 1 attempt + max_retries (3) of the test policy.
    assert_eq!(server.received_requests().await.unwrap().len(), 4);
}

#[tokio::test]
async fn rate_limit_429_honours_retry_after() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(runtime("BUILDING")))
        .mount(&server)
        .await;
    let controller = prep(&server);
    let started = Instant::now();
    controller
        .restart(&JobKey("cycle-1/prepare/job".into()))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn rate_limit_429_honours_the_ratelimit_header() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("ratelimit", "\"resolvers\";r=0;t=0")
                .insert_header(
                    "ratelimit-policy",
                    "\"fixed window\";\"resolvers\";q=5000;w=300",
                ),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    mount_metadata(
        &server,
        "abc",
        "\"e1\"",
        metadata_json("v1", 1).to_string().as_bytes(),
    )
    .await;
    let store = store(&server);
    let started = Instant::now();
    // t=0 → wait t+1 = 1 s, then the marker equals the known one.
    let read = store.read(Some("abc:e1".into())).await.unwrap();
    assert_eq!(read, MetadataRead::Unchanged);
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn rate_limit_too_long_gives_a_transient_error_with_the_reset_time() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("ratelimit", "\"api\";r=0;t=3599"))
        .mount(&server)
        .await;
    let controller = prep(&server);
    let err = controller
        .restart(&JobKey("cycle-1/prepare/job".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::Transient(_)), "{err:?}");
    check_message(&err, "owner/prep");
    check_message(&err, "3600s");
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

fn variables_json(vars: &[(&str, &str)]) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = vars
        .iter()
        .map(|(k, v)| {
            (
                (*k).to_owned(),
                json!({"value": v, "description": null, "updatedAt": "2025-11-01T00:00:00.000Z"}),
            )
        })
        .collect();
    serde_json::Value::Object(map)
}

/// Expects `times` authorised calls setting the variable `key` of Space
/// `owner/train` to `value`.
async fn expect_variable_set(server: &MockServer, key: &str, value: &str, times: u64) {
    Mock::given(method("POST"))
        .and(path("/api/spaces/owner/train/variables"))
        .and(bearer())
        .and(body_json(json!({"key": key, "value": value})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .expect(times)
        .mount(server)
        .await;
}

#[tokio::test]
async fn trainer_sets_dataset_version_and_job_key_then_restarts() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/spaces/owner/train/variables"))
        .and(bearer())
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(variables_json(&[("DATASET_VERSION", "v20251001_000000")])),
        )
        .expect(1)
        .mount(&server)
        .await;
    expect_variable_set(&server, "DATASET_VERSION", "v20251030_115250", 1).await;
    expect_variable_set(&server, "RETRAIN_JOB_KEY", "run-1/train/1", 1).await;
    Mock::given(method("POST"))
        .and(path("/api/spaces/owner/train/restart"))
        .and(bearer())
        .respond_with(ResponseTemplate::new(200).set_body_json(runtime("BUILDING")))
        .expect(1)
        .mount(&server)
        .await;
    let trainer = HfSpaceTrainer::new(client(&server), "owner/train", None).unwrap();
    let req = request("v20251030_115250");
    let handle = trainer.start(&req).await.unwrap();
    assert_eq!(handle.kind, HANDLE_KIND);
    assert_eq!(
        handle.data,
        json!({"space": "owner/train", "dataset_version": "v20251030_115250"})
    );
    let calls: Vec<(String, String)> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let body = serde_json::from_slice::<serde_json::Value>(&r.body)
                .ok()
                .and_then(|b| b.get("key").and_then(|k| k.as_str()).map(str::to_owned))
                .unwrap_or_default();
            (format!("{} {}", r.method, r.url.path()), body)
        })
        .collect();
    assert_eq!(
        calls,
        [
            (
                "GET /api/spaces/owner/train/variables".into(),
                String::new()
            ),
            (
                "POST /api/spaces/owner/train/variables".into(),
                "DATASET_VERSION".into()
            ),
            (
                "POST /api/spaces/owner/train/variables".into(),
                "RETRAIN_JOB_KEY".into()
            ),
            ("POST /api/spaces/owner/train/restart".into(), String::new()),
        ],
        "the version, then the key, must be set before the restart"
    );
    // No wait configured: the Space decides by itself.
    let outcome = trainer.wait(&req, &handle).await.unwrap();
    let TrainingOutcome::Finished(candidate) = outcome else {
        panic!("expected Finished, got {outcome:?}")
    };
    assert_eq!(candidate.id, "owner/train@v20251030_115250");
    assert!(candidate.metrics.is_empty());
    trainer.cancel(&handle).await.unwrap();
}

#[tokio::test]
async fn trainer_adopts_a_space_already_restarted_for_the_job_key() {
    for stage in ["BUILDING", "RUNNING_APP_STARTING", "RUNNING"] {
        let server = MockServer::start().await;
        json_route(
            "GET",
            "/api/spaces/owner/train/variables",
            200,
            variables_json(&[
                ("DATASET_VERSION", "v2"),
                ("RETRAIN_JOB_KEY", "run-1/train/1"),
            ]),
        )
        .mount(&server)
        .await;
        json_route(
            "GET",
            "/api/spaces/owner/train/runtime",
            200,
            runtime(stage),
        )
        .mount(&server)
        .await;
        let trainer = HfSpaceTrainer::new(client(&server), "owner/train", None).unwrap();
        let handle = trainer.start(&request("v2")).await.unwrap();
        assert_eq!(
            handle.data,
            json!({"space": "owner/train", "dataset_version": "v2"})
        );
        let posts = server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .filter(|r| r.method.as_str() == "POST")
            .count();
        assert_eq!(posts, 0, "{stage}: adopted, so nothing may be posted");
    }
}

#[tokio::test]
async fn trainer_restarts_when_the_space_shows_no_restart_for_the_key() {
    // The variables were set for this job, but the restart never happened
    // (or the Space was paused since): restart, without setting them again.
    let server = MockServer::start().await;
    json_route(
        "GET",
        "/api/spaces/owner/train/variables",
        200,
        variables_json(&[
            ("DATASET_VERSION", "v2"),
            ("RETRAIN_JOB_KEY", "run-1/train/1"),
        ]),
    )
    .mount(&server)
    .await;
    json_route(
        "GET",
        "/api/spaces/owner/train/runtime",
        200,
        runtime("PAUSED"),
    )
    .mount(&server)
    .await;
    json_route(
        "POST",
        "/api/spaces/owner/train/restart",
        200,
        runtime("BUILDING"),
    )
    .expect(1)
    .mount(&server)
    .await;
    let trainer = HfSpaceTrainer::new(client(&server), "owner/train", None).unwrap();
    trainer.start(&request("v2")).await.unwrap();
    let posts: Vec<String> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.method.as_str() == "POST")
        .map(|r| r.url.path().to_owned())
        .collect();
    assert_eq!(posts, ["/api/spaces/owner/train/restart"]);
}

#[tokio::test]
async fn trainer_variable_denied_names_the_space_and_does_not_restart() {
    let server = MockServer::start().await;
    json_route("GET", "/api/spaces/owner/train/variables", 200, json!({}))
        .mount(&server)
        .await;
    status_route("POST", "/api/spaces/owner/train/variables", 403)
        .mount(&server)
        .await;
    let trainer = HfSpaceTrainer::new(client(&server), "owner/train", None).unwrap();
    let err = trainer.start(&request("v2")).await.unwrap_err();
    assert!(matches!(err, PortError::Denied(_)), "{err:?}");
    check_message(&err, "owner/train");
    check_message(&err, "write access");
    assert_eq!(server.received_requests().await.unwrap().len(), 2);

    // Reading the variables needs the same access.
    server.reset().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    let err = trainer.start(&request("v2")).await.unwrap_err();
    assert!(matches!(err, PortError::Denied(_)), "{err:?}");
    check_message(&err, "variables of Space owner/train");
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_restart_answered_5xx_is_not_reposted_when_the_space_is_restarting() {
    let server = MockServer::start().await;
    status_route("POST", "/api/spaces/owner/prep/restart", 504)
        .mount(&server)
        .await;
    json_route(
        "GET",
        "/api/spaces/owner/prep/runtime",
        200,
        runtime("BUILDING"),
    )
    .mount(&server)
    .await;
    let calls = restart_prep(&server).await;
    assert_eq!(
        calls,
        [
            "POST /api/spaces/owner/prep/restart",
            "GET /api/spaces/owner/prep/runtime"
        ]
    );
}

#[tokio::test]
async fn a_restart_answered_5xx_is_reposted_only_when_the_space_shows_no_restart() {
    let server = MockServer::start().await;
    status_route("POST", "/api/spaces/owner/prep/restart", 502)
        .up_to_n_times(1)
        .mount(&server)
        .await;
    json_route(
        "POST",
        "/api/spaces/owner/prep/restart",
        200,
        runtime("BUILDING"),
    )
    .mount(&server)
    .await;
    json_route(
        "GET",
        "/api/spaces/owner/prep/runtime",
        200,
        runtime("RUNNING"),
    )
    .mount(&server)
    .await;
    let resent = || {
        retrain_adapters::http::retries()
            .into_iter()
            .find(|r| (r.adapter, r.reason) == ("hf", "http_5xx"))
            .map_or(0, |r| r.count)
    };
    let before = resent();
    let calls = restart_prep(&server).await;
    assert_eq!(
        calls,
        [
            "POST /api/spaces/owner/prep/restart",
            "GET /api/spaces/owner/prep/runtime",
            "POST /api/spaces/owner/prep/restart"
        ]
    );
    // Counted for `retrain_http_retries_total` (process-wide: other tests
    // may add to it meanwhile).
    assert!(resent() > before);
}

#[tokio::test]
async fn a_timed_out_restart_with_an_unreadable_runtime_fails_instead_of_reposting() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/spaces/owner/prep/restart"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(runtime("BUILDING"))
                .set_delay(Duration::from_secs(2)),
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let mut settings = settings(&server);
    settings.policy.timeout = Duration::from_millis(300);
    let controller =
        HfSpaceController::new(HubClient::new(settings).unwrap(), "owner/prep", false).unwrap();
    let err = controller
        .restart(&JobKey("cycle-1/prepare/job".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::Transient(_)), "{err:?}");
    check_message(&err, "timed out");
    check_message(&err, "not posted again blindly");
    let posts = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.method.as_str() == "POST")
        .count();
    assert_eq!(posts, 1);
}

#[tokio::test]
async fn trainer_wait_polls_until_running() {
    let server = MockServer::start().await;
    json_route(
        "GET",
        "/api/spaces/owner/train/runtime",
        200,
        runtime("BUILDING"),
    )
    .up_to_n_times(2)
    .mount(&server)
    .await;
    json_route(
        "GET",
        "/api/spaces/owner/train/runtime",
        200,
        runtime("RUNNING"),
    )
    .mount(&server)
    .await;
    let trainer = HfSpaceTrainer::new(client(&server), "owner/train", Some(Duration::from_secs(5)))
        .unwrap()
        .with_poll_interval(Duration::from_millis(10));
    let handle = TrainingHandle {
        kind: HANDLE_KIND.into(),
        data: json!({"space": "owner/train", "dataset_version": "v2"}),
    };
    let outcome = trainer.wait(&request("v2"), &handle).await.unwrap();
    assert!(matches!(outcome, TrainingOutcome::Finished(c) if c.id == "owner/train@v2"));
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
}

#[tokio::test]
async fn trainer_wait_fails_fast_on_error_stage_with_the_error_message() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(
                json!({"stage": "RUNTIME_ERROR", "errorMessage": "CUDA out of memory"}),
            ),
        )
        .mount(&server)
        .await;
    let trainer =
        HfSpaceTrainer::new(client(&server), "owner/train", Some(Duration::from_secs(5))).unwrap();
    let handle = TrainingHandle {
        kind: HANDLE_KIND.into(),
        data: json!({"space": "owner/train", "dataset_version": "v2"}),
    };
    let err = trainer.wait(&request("v2"), &handle).await.unwrap_err();
    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    check_message(&err, "owner/train");
    check_message(&err, "RUNTIME_ERROR");
    check_message(&err, "CUDA out of memory");
}

#[tokio::test]
async fn trainer_wait_is_bounded() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(runtime("BUILDING")))
        .mount(&server)
        .await;
    let trainer = HfSpaceTrainer::new(
        client(&server),
        "owner/train",
        Some(Duration::from_millis(200)),
    )
    .unwrap()
    .with_poll_interval(Duration::from_millis(20));
    let handle = TrainingHandle {
        kind: HANDLE_KIND.into(),
        data: json!({"space": "owner/train", "dataset_version": "v2"}),
    };
    let started = Instant::now();
    let err = trainer.wait(&request("v2"), &handle).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    check_message(&err, "did not reach RUNNING");
    check_message(&err, "BUILDING");
    // A handle of another trainer kind is a configuration error.
    let foreign = TrainingHandle {
        kind: "command".into(),
        data: json!({}),
    };
    assert!(matches!(
        trainer.wait(&request("v2"), &foreign).await,
        Err(PortError::Config(_))
    ));
}

/// The resolve URL as the Hub answers a small file: `200` with the content,
/// `X-Repo-Commit` and `ETag`, or `304` without a body when `If-None-Match`
/// names that `ETag`.
async fn mount_metadata(server: &MockServer, commit: &str, etag: &str, body: &[u8]) {
    Mock::given(method("GET"))
        .and(path(META_PATH))
        .and(bearer())
        .and(header("if-none-match", etag))
        .respond_with(
            ResponseTemplate::new(304)
                .insert_header("x-repo-commit", commit)
                .insert_header("etag", etag),
        )
        .with_priority(1)
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path(META_PATH))
        .and(bearer())
        .and(header("accept-encoding", "identity"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-repo-commit", commit)
                .insert_header("etag", etag)
                .set_body_raw(body.to_vec(), "application/json"),
        )
        .mount(server)
        .await;
}

fn if_none_match(request: &wiremock::Request) -> Option<&str> {
    request
        .headers
        .get("if-none-match")
        .and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn metadata_is_one_conditional_get_and_a_304_costs_no_body() {
    let server = MockServer::start().await;
    let body = metadata_json("v20251030_115250", 1600).to_string();
    mount_metadata(&server, "c379e821", "W/\"5a1b\"", body.as_bytes()).await;
    let store = store(&server);

    let read = store.read(None).await.unwrap();
    let MetadataRead::Published(version) = read else {
        panic!("expected Published, got {read:?}")
    };
    assert_eq!(version.metadata.version_tag.as_str(), "v20251030_115250");
    assert_eq!(version.metadata.num_samples, 1600);
    assert_eq!(version.revision.as_deref(), Some("c379e821:5a1b"));
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1, "one request per read, no HEAD first");
    assert_eq!(if_none_match(&requests[0]), None, "nothing to match yet");

    // The ETag comes back exactly as sent; the Hub answers 304, no body.
    let again = store.read(version.revision.clone()).await.unwrap();
    assert_eq!(again, MetadataRead::Unchanged);
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    assert_eq!(if_none_match(&requests[1]), Some("W/\"5a1b\""));

    // A 304 with another known marker (a run that never saw this file)
    // answers with the file downloaded before.
    let other = store.read(Some("old:marker".into())).await.unwrap();
    assert_eq!(other, MetadataRead::Published(version.clone()));
    let other = store.read(None).await.unwrap();
    assert_eq!(other, MetadataRead::Published(version));
    assert_eq!(server.received_requests().await.unwrap().len(), 4);
}

#[tokio::test]
async fn metadata_changed_since_the_etag_is_downloaded_in_the_same_request() {
    let server = MockServer::start().await;
    mount_metadata(
        &server,
        "c1",
        "\"e1\"",
        metadata_json("v1", 1).to_string().as_bytes(),
    )
    .await;
    let store = store(&server);
    let MetadataRead::Published(first) = store.read(None).await.unwrap() else {
        panic!("v1 should be published")
    };
    server.reset().await;
    mount_metadata(
        &server,
        "c2",
        "\"e2\"",
        metadata_json("v2", 2).to_string().as_bytes(),
    )
    .await;
    let MetadataRead::Published(second) = store.read(first.revision.clone()).await.unwrap() else {
        panic!("v2 should be published")
    };
    assert_eq!(second.metadata.version_tag.as_str(), "v2");
    assert_eq!(second.revision.as_deref(), Some("c2:e2"));
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1, "the changed file came with the 200");
    assert_eq!(if_none_match(&requests[0]), Some("\"e1\""));
    // And the next read is conditional on the new ETag.
    assert_eq!(
        store.read(second.revision).await.unwrap(),
        MetadataRead::Unchanged
    );
    let requests = server.received_requests().await.unwrap();
    assert_eq!(if_none_match(&requests[1]), Some("\"e2\""));
}

#[tokio::test]
async fn a_server_ignoring_if_none_match_still_reads_as_unchanged() {
    // A plain file server (or a proxy) that always answers 200: the change
    // marker decides, as with the Hub's own headers.
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-repo-commit", "c1")
                .insert_header("etag", "\"e1\"")
                .set_body_raw(metadata_json("v1", 1).to_string(), "application/json"),
        )
        .mount(&server)
        .await;
    let store = store(&server);
    let MetadataRead::Published(first) = store.read(None).await.unwrap() else {
        panic!("v1 should be published")
    };
    assert_eq!(
        store.read(first.revision).await.unwrap(),
        MetadataRead::Unchanged
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn reads_of_one_file_in_flight_together_share_one_request() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(META_PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-repo-commit", "c1")
                .insert_header("etag", "\"e1\"")
                .set_body_raw(metadata_json("v1", 1).to_string(), "application/json")
                .set_delay(Duration::from_millis(300)),
        )
        .mount(&server)
        .await;
    let store = store(&server);
    // Labels that read the same metadata file hold clones of one store.
    let reads = (0..20).map(|i| {
        let store = store.clone();
        // Half of them already know the version, half do not.
        let known = (i % 2 == 0).then(|| "c1:e1".to_owned());
        async move { (known.clone(), store.read(known).await.unwrap()) }
    });
    for (known, read) in futures::future::join_all(reads).await {
        match known {
            Some(_) => assert_eq!(read, MetadataRead::Unchanged),
            None => assert!(matches!(read, MetadataRead::Published(_)), "{read:?}"),
        }
    }
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        1,
        "one request for 20 concurrent reads"
    );
    // A read after that one finished sends its own request.
    store.read(None).await.unwrap();
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn an_unasked_304_is_an_invalid_response() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(304))
        .mount(&server)
        .await;
    let err = store(&server).read(None).await.unwrap_err();
    assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
    check_message(&err, "304");
    check_message(&err, "owner/ds");
}

#[tokio::test]
async fn metadata_prefers_x_linked_etag() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-repo-commit", "c1")
                .insert_header("x-linked-etag", "\"sha256abc\"")
                .insert_header("etag", "\"other\""),
        )
        .mount(&server)
        .await;
    let store = store(&server);
    assert_eq!(
        store.read(Some("c1:sha256abc".into())).await.unwrap(),
        MetadataRead::Unchanged
    );
}

#[tokio::test]
async fn metadata_absent_on_entry_not_found_or_bare_404() {
    let server = MockServer::start().await;
    let store = store(&server);
    for response in [
        ResponseTemplate::new(404)
            .insert_header("x-error-code", "EntryNotFound")
            .insert_header("x-error-message", "Entry not found"),
        ResponseTemplate::new(404),
    ] {
        server.reset().await;
        Mock::given(method("GET"))
            .respond_with(response)
            .mount(&server)
            .await;
        assert_eq!(store.read(None).await.unwrap(), MetadataRead::Absent);
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }
}

#[tokio::test]
async fn metadata_repo_errors_name_the_repo_and_never_the_token() {
    let server = MockServer::start().await;
    let store = store(&server);
    let cases = [
        (
            ResponseTemplate::new(404)
                .insert_header("x-error-code", "RepoNotFound")
                .insert_header("x-error-message", "Repository not found"),
            "not found",
        ),
        (
            ResponseTemplate::new(404)
                .insert_header("x-error-code", "RevisionNotFound")
                .insert_header("x-error-message", "Invalid rev id: main"),
            "revision",
        ),
        (ResponseTemplate::new(401), "read access"),
        (
            ResponseTemplate::new(403).insert_header("x-error-code", "GatedRepo"),
            "gated",
        ),
    ];
    for (response, needle) in cases {
        server.reset().await;
        Mock::given(method("GET"))
            .respond_with(response)
            .mount(&server)
            .await;
        let err = store.read(None).await.unwrap_err();
        assert!(
            matches!(err, PortError::NotFound(_) | PortError::Denied(_)),
            "{err:?}"
        );
        check_message(&err, "owner/ds");
        check_message(&err, needle);
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }
}

#[tokio::test]
async fn metadata_errors_name_the_url_and_the_field() {
    let server = MockServer::start().await;
    let store = store(&server);
    let cases: [(&[u8], &str); 4] = [
        (b"{not json", "not valid JSON"),
        (
            br#"{"dataset_name":"d","version_tag":"v","created_at":"2025-10-30T11:53:01Z"}"#,
            "`num_samples`",
        ),
        (
            br#"{"dataset_name":"d","version_tag":"v","num_samples":"12","created_at":"2025-10-30T11:53:01Z"}"#,
            "`num_samples`",
        ),
        (
            br#"{"dataset_name":"d","num_samples":1,"created_at":"2025-10-30T11:53:01Z"}"#,
            "`version_tag`",
        ),
    ];
    for (body, needle) in cases {
        server.reset().await;
        mount_metadata(&server, "c1", "\"e1\"", body).await;
        let err = store.read(None).await.unwrap_err();
        assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
        check_message(&err, needle);
        check_message(&err, META_PATH);
        check_message(&err, "owner/ds");
    }
}

#[tokio::test]
async fn hf_url_with_revision_is_quoted_like_the_python_client() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(404).insert_header("x-error-code", "EntryNotFound"))
        .mount(&server)
        .await;
    for (address, expected) in [
        (
            "hf://datasets/owner/ds@refs/pr/1/meta/dataset_metadata.json",
            "/datasets/owner/ds/resolve/refs%2Fpr%2F1/meta/dataset_metadata.json",
        ),
        (
            "hf://datasets/owner/ds@v1.2/dataset_metadata.json",
            "/datasets/owner/ds/resolve/v1.2/dataset_metadata.json",
        ),
        (
            "hf://datasets/owner/ds/dataset_metadata.json",
            "/datasets/owner/ds/resolve/main/dataset_metadata.json",
        ),
    ] {
        let store = HfMetadataStore::from_url(client(&server), address).unwrap();
        assert_eq!(store.read(None).await.unwrap(), MetadataRead::Absent);
        let requests = server.received_requests().await.unwrap();
        let last = requests.last().unwrap();
        assert_eq!(last.url.path(), expected, "{address}");
        assert_eq!(store.repo().unwrap().to_string(), "owner/ds");
    }
}

#[tokio::test]
async fn token_is_only_sent_to_the_configured_endpoint() {
    let hub = MockServer::start().await;
    let elsewhere = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("etag", "\"e\"")
                .set_body_raw(metadata_json("v1", 1).to_string(), "application/json"),
        )
        .mount(&elsewhere)
        .await;
    let store = HfMetadataStore::from_url(
        client(&hub),
        &format!("{}/datasets/owner/ds/resolve/main/m.json", elsewhere.uri()),
    )
    .unwrap();
    assert!(matches!(
        store.read(None).await.unwrap(),
        MetadataRead::Published(_)
    ));
    for request in elsewhere.received_requests().await.unwrap() {
        assert!(
            !request.headers.contains_key("authorization"),
            "token sent to a foreign host"
        );
    }
}

#[tokio::test]
async fn the_hub_redirect_gives_the_marker_and_only_the_download_reaches_the_cdn() {
    let hub = MockServer::start().await;
    let cdn = MockServer::start().await;
    let cdn_url = format!("{}/blob/abc", cdn.uri());
    // An LFS file: the Hub answers with an absolute redirect carrying the
    // file's marker; the probe does not follow it, the download does.
    Mock::given(method("GET"))
        .and(path(META_PATH))
        .respond_with(
            ResponseTemplate::new(302)
                .insert_header("location", cdn_url.as_str())
                .insert_header("x-repo-commit", "c9")
                .insert_header("x-linked-etag", "\"lfs-sha\""),
        )
        .mount(&hub)
        .await;
    Mock::given(method("GET"))
        .and(path("/blob/abc"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(metadata_json("v3", 5).to_string(), "application/json"),
        )
        .mount(&cdn)
        .await;
    let store = store(&hub);
    let read = store.read(None).await.unwrap();
    let MetadataRead::Published(version) = read else {
        panic!("expected Published, got {read:?}")
    };
    assert_eq!(version.revision.as_deref(), Some("c9:lfs-sha"));
    let cdn_requests = cdn.received_requests().await.unwrap();
    assert_eq!(cdn_requests.len(), 1, "only the download reaches the CDN");
    assert_eq!(cdn_requests[0].method.as_str(), "GET");
    assert!(!cdn_requests[0].headers.contains_key("authorization"));
    assert_eq!(hub.received_requests().await.unwrap().len(), 2);
    assert_eq!(
        store.read(version.revision).await.unwrap(),
        MetadataRead::Unchanged
    );
    assert_eq!(cdn.received_requests().await.unwrap().len(), 1);
    assert_eq!(hub.received_requests().await.unwrap().len(), 3);
}

#[tokio::test]
async fn metadata_5xx_then_success() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&server)
        .await;
    mount_metadata(
        &server,
        "c1",
        "\"e1\"",
        metadata_json("v1", 3).to_string().as_bytes(),
    )
    .await;
    let read = store(&server).read(None).await.unwrap();
    assert!(matches!(read, MetadataRead::Published(_)), "{read:?}");
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
}

#[cfg(feature = "testing")]
mod fake {
    use super::*;
    use retrain_adapters::testing::fake_hub::{FakeHub, LostResponse};

    const PATH: &str = "dataset_metadata.json";

    #[tokio::test]
    async fn restart_publishes_after_the_delay_and_bumps_the_marker() {
        let hub = FakeHub::start().await;
        hub.add_space("owner/prep", "RUNNING");
        hub.add_dataset("owner/ds", PATH, Some(metadata_json("v1", 10)));
        hub.on_restart_publish(
            "owner/prep",
            "owner/ds",
            PATH,
            metadata_json("v2", 100),
            Duration::from_millis(150),
        );
        let controller = HfSpaceController::new(hub.client(), "owner/prep", false).unwrap();
        let store =
            HfMetadataStore::from_url(hub.client(), &hub.metadata_url("owner/ds", PATH)).unwrap();

        let MetadataRead::Published(first) = store.read(None).await.unwrap() else {
            panic!("v1 should be published")
        };
        assert_eq!(first.metadata.version_tag.as_str(), "v1");
        assert_eq!(
            store.read(first.revision.clone()).await.unwrap(),
            MetadataRead::Unchanged
        );
        // Two conditional GETs, the second answered 304; no HEAD.
        assert_eq!(hub.metadata_gets("owner/ds"), 2);
        assert_eq!(hub.metadata_not_modified("owner/ds"), 1);
        assert_eq!(hub.metadata_heads("owner/ds"), 0);

        controller
            .restart(&JobKey("cycle-1/prepare/job".into()))
            .await
            .unwrap();
        assert_eq!(hub.restarts("owner/prep"), 1);
        assert_eq!(controller.stage().await.unwrap(), SpaceStage::Running);
        // Not yet: the Space takes its time.
        assert_eq!(
            store.read(first.revision.clone()).await.unwrap(),
            MetadataRead::Unchanged
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let MetadataRead::Published(second) = store.read(first.revision.clone()).await.unwrap()
        else {
            panic!("v2 should be published after the delay")
        };
        assert_eq!(second.metadata.version_tag.as_str(), "v2");
        assert_eq!(second.metadata.num_samples, 100);
        assert_ne!(second.revision, first.revision);
        // The new version came in the answer to the conditional GET.
        assert_eq!(hub.metadata_gets("owner/ds"), 4);
        assert_eq!(hub.metadata_not_modified("owner/ds"), 2);
        assert_eq!(hub.posts(), 1);
        assert!(hub.requests().iter().all(|r| r.authorized));
    }

    #[tokio::test]
    async fn absent_until_first_publication() {
        let hub = FakeHub::start().await;
        hub.add_dataset("owner/ds", PATH, None);
        let store =
            HfMetadataStore::from_url(hub.client(), &format!("hf://datasets/owner/ds/{PATH}"))
                .unwrap();
        // hf:// resolves against the configured endpoint (the fake).
        assert_eq!(store.read(None).await.unwrap(), MetadataRead::Absent);
        hub.publish("owner/ds", PATH, metadata_json("v1", 1));
        assert!(matches!(
            store.read(None).await.unwrap(),
            MetadataRead::Published(_)
        ));
        // Unknown repo: an error, not "absent".
        let missing =
            HfMetadataStore::from_url(hub.client(), &hub.metadata_url("owner/nope", PATH)).unwrap();
        let err = missing.read(None).await.unwrap_err();
        assert!(matches!(err, PortError::NotFound(_)), "{err:?}");
        check_message(&err, "owner/nope");
    }

    #[tokio::test]
    async fn trainer_sets_the_variable_and_waits_for_running() {
        let hub = FakeHub::start().await;
        hub.add_space("owner/train", "PAUSED");
        hub.set_restart_stages("owner/train", &["BUILDING", "APP_STARTING", "RUNNING"]);
        let trainer =
            HfSpaceTrainer::new(hub.client(), "owner/train", Some(Duration::from_secs(5)))
                .unwrap()
                .with_poll_interval(Duration::from_millis(5));
        assert!(!trainer.start_is_the_job(), "it waits for RUNNING");
        let req = request("v7");
        let handle = trainer.start(&req).await.unwrap();
        assert_eq!(hub.variables("owner/train")["DATASET_VERSION"], "v7");
        assert_eq!(hub.restarts("owner/train"), 1);
        assert_eq!(hub.factory_restarts("owner/train"), 0);
        // What the Space's app sees at its restart.
        let env = hub.started_env("owner/train");
        assert_eq!(env["DATASET_VERSION"], "v7");
        assert_eq!(env["RETRAIN_JOB_KEY"], "run-1/train/1");
        let outcome = trainer.wait(&req, &handle).await.unwrap();
        assert!(matches!(outcome, TrainingOutcome::Finished(c) if c.id == "owner/train@v7"));
        assert_eq!(hub.posts(), 3, "two variables and one restart");
    }

    fn keyed(version: &str, key: &str) -> TrainingRequest {
        let mut req = request(version);
        req.job_key = JobKey(key.into());
        req
    }

    /// A resumed run calls `start` again after a crash between the restart
    /// and its journal write: the Space must not be restarted again.
    #[tokio::test]
    async fn trainer_start_is_idempotent_for_the_job_key() {
        let hub = FakeHub::start().await;
        hub.add_space("owner/train", "PAUSED");
        hub.set_restart_stages("owner/train", &["BUILDING", "APP_STARTING", "RUNNING"]);
        let req = keyed("v7", "run-9/train/1");
        let first = HfSpaceTrainer::new(hub.client(), "owner/train", None)
            .unwrap()
            .start(&req)
            .await
            .unwrap();
        // Another process, while the Space builds, then once it runs.
        for _ in 0..4 {
            let again = HfSpaceTrainer::new(hub.client(), "owner/train", None)
                .unwrap()
                .start(&req)
                .await
                .unwrap();
            assert_eq!(again, first);
        }
        assert_eq!(hub.stage("owner/train").as_deref(), Some("RUNNING"));
        assert_eq!(hub.restarts("owner/train"), 1);
        assert_eq!(hub.restarts_for_job("owner/train", "run-9/train/1"), 1);
        assert_eq!(hub.rejected_restarts("owner/train"), 0);

        // The next job (another key, same version) restarts it once more.
        let next = keyed("v7", "run-9/train/2");
        let trainer = HfSpaceTrainer::new(hub.client(), "owner/train", None).unwrap();
        trainer.start(&next).await.unwrap();
        trainer.start(&next).await.unwrap();
        assert_eq!(hub.restarts_for_job("owner/train", "run-9/train/2"), 1);
        assert_eq!(hub.restarts("owner/train"), 2);
        assert_eq!(
            hub.started_env("owner/train")["RETRAIN_JOB_KEY"],
            "run-9/train/2"
        );
        assert_eq!(hub.rejected_restarts("owner/train"), 0);
    }

    /// A first start (the engine has just journaled the intent) cannot
    /// find a job to adopt: it does not read the variables. Three requests:
    /// both variables, the restart. A later start for the same key that is
    /// not a first start (a resumed run) still finds the job and adopts it.
    #[tokio::test]
    async fn a_first_start_does_not_read_the_variables() {
        let hub = FakeHub::start().await;
        hub.add_space("owner/train", "RUNNING");
        let trainer = HfSpaceTrainer::new(hub.client(), "owner/train", None).unwrap();
        // Seed 000: the restart is the whole job (no `wait_for_running`).
        assert!(trainer.start_is_the_job());
        let mut first = keyed("v7", "run-5/train/1");
        first.first_start = true;
        let handle = trainer.start(&first).await.unwrap();
        let calls: Vec<(String, String)> = hub
            .requests()
            .into_iter()
            .map(|r| (r.method, r.path))
            .collect();
        assert_eq!(
            calls,
            [
                (
                    "POST".to_string(),
                    "/api/spaces/owner/train/variables".to_string()
                ),
                (
                    "POST".to_string(),
                    "/api/spaces/owner/train/variables".to_string()
                ),
                (
                    "POST".to_string(),
                    "/api/spaces/owner/train/restart".to_string()
                ),
            ]
        );
        let env = hub.started_env("owner/train");
        assert_eq!(env["DATASET_VERSION"], "v7");
        assert_eq!(env["RETRAIN_JOB_KEY"], "run-5/train/1");

        let resumed = keyed("v7", "run-5/train/1");
        assert_eq!(trainer.start(&resumed).await.unwrap(), handle);
        assert_eq!(hub.restarts_for_job("owner/train", "run-5/train/1"), 1);
        assert_eq!(hub.rejected_restarts("owner/train"), 0);
    }

    /// An interrupt while a retrain Space trains (`wait_running`) leaves the
    /// job to the resumed run, which awaits the same restart: a Space
    /// cannot be stopped, and a job journaled as cancelled would be
    /// restarted under a new key, in the middle of its training.
    #[tokio::test]
    async fn an_interrupted_space_training_is_awaited_by_the_resumed_run() {
        use retrain_adapters::store::{open_run_store, StoreOptions};
        use retrain_core::engine::CycleRequest;
        use retrain_core::report::LabelStatus;
        use retrain_core::CancellationToken;

        let hub = FakeHub::start().await;
        hub.add_space("owner/train", "RUNNING");
        // Restarted, the Space builds until told otherwise.
        hub.set_restart_stages("owner/train", &["BUILDING"]);
        hub.add_dataset("owner/ds", PATH, Some(metadata_json("v1", 10)));
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let engine = || async {
            let store = open_run_store(&url, StoreOptions::default()).await.unwrap();
            let trainer =
                HfSpaceTrainer::new(hub.client(), "owner/train", Some(Duration::from_secs(5)))
                    .unwrap()
                    .with_poll_interval(Duration::from_millis(20));
            let metadata =
                HfMetadataStore::from_url(hub.client(), &hub.metadata_url("owner/ds", PATH))
                    .unwrap();
            crate::common::one_label_engine(
                store,
                crate::store_contract::plan("seg"),
                std::sync::Arc::new(metadata),
                std::sync::Arc::new(trainer),
                None,
            )
        };

        // Interrupted once the Space was restarted for the job.
        let first = engine().await;
        let cancel = CancellationToken::new();
        let (report, ()) = tokio::join!(
            first.run_cycle(CycleRequest::default(), cancel.clone()),
            async {
                let deadline = Instant::now() + Duration::from_secs(30);
                while hub.restarts("owner/train") == 0 {
                    assert!(Instant::now() < deadline, "the Space was never restarted");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                cancel.cancel();
            }
        );
        let report = report.unwrap();
        assert_eq!(
            report.labels[0].status,
            LabelStatus::Interrupted,
            "{report:?}"
        );
        drop(first);

        // The Space finishes building; the next process awaits that job.
        hub.set_stage("owner/train", "RUNNING");
        hub.set_restart_stages("owner/train", &["RUNNING"]);
        let report = engine()
            .await
            .run_cycle(CycleRequest::default(), CancellationToken::new())
            .await
            .unwrap();
        let label = &report.labels[0];
        assert!(label.resumed, "{label:?}");
        assert_eq!(label.status, LabelStatus::Trained, "{label:?}");
        assert_eq!(hub.restarts("owner/train"), 1, "restarted again: {label:?}");
        assert_eq!(hub.rejected_restarts("owner/train"), 0);
    }

    #[tokio::test]
    async fn the_fake_hub_refuses_a_second_restart_for_one_job() {
        let hub = FakeHub::start().await;
        hub.add_space("owner/train", "RUNNING");
        let trainer = HfSpaceTrainer::new(hub.client(), "owner/train", None).unwrap();
        trainer.start(&keyed("v1", "run-x/train/1")).await.unwrap();
        // A controller restarting the same Space blindly: refused.
        let blind = HfSpaceController::new(hub.client(), "owner/train", false).unwrap();
        let err = blind
            .restart(&JobKey("cycle/prepare/x".into()))
            .await
            .unwrap_err();
        check_message(&err, "already restarted for job run-x/train/1");
        assert_eq!(hub.rejected_restarts("owner/train"), 1);
        assert_eq!(hub.restarts("owner/train"), 1);
        hub.allow_repeated_job_restarts("owner/train");
        blind
            .restart(&JobKey("cycle/prepare/x".into()))
            .await
            .unwrap();
        assert_eq!(hub.restarts_for_job("owner/train", "run-x/train/1"), 2);
    }

    fn short_timeout(hub: &FakeHub) -> HubClient {
        let mut settings = hub.settings();
        settings.policy.timeout = Duration::from_millis(300);
        HubClient::new(settings).unwrap()
    }

    #[tokio::test]
    async fn a_restart_whose_response_was_lost_is_not_posted_again() {
        for lost in [
            LostResponse::Delay(Duration::from_secs(2)),
            LostResponse::Status(502),
        ] {
            // The prepare controller.
            let hub = FakeHub::start().await;
            hub.add_space("owner/prep", "RUNNING");
            hub.set_restart_stages("owner/prep", &["BUILDING", "RUNNING"]);
            hub.lose_next_restart_response("owner/prep", lost);
            let controller =
                HfSpaceController::new(short_timeout(&hub), "owner/prep", false).unwrap();
            controller
                .restart(&JobKey("cycle-1/prepare/job".into()))
                .await
                .unwrap();
            assert_eq!(hub.restarts("owner/prep"), 1, "{lost:?}: re-posted blindly");

            // The trainer.
            hub.add_space("owner/train", "RUNNING");
            hub.set_restart_stages("owner/train", &["APP_STARTING", "RUNNING"]);
            hub.lose_next_restart_response("owner/train", lost);
            let trainer = HfSpaceTrainer::new(short_timeout(&hub), "owner/train", None).unwrap();
            let req = keyed("v3", "run-t/train/1");
            trainer.start(&req).await.unwrap();
            assert_eq!(hub.restarts_for_job("owner/train", "run-t/train/1"), 1);
            assert_eq!(hub.rejected_restarts("owner/train"), 0, "{lost:?}");
        }
    }

    #[tokio::test]
    async fn error_stage_after_restart_is_reported_with_its_message() {
        let hub = FakeHub::start().await;
        hub.add_space("owner/prep", "RUNNING");
        hub.set_restart_stages("owner/prep", &["BUILDING", "BUILD_ERROR"]);
        hub.set_error_message("owner/prep", "requirements.txt: no such package");
        let controller = HfSpaceController::new(hub.client(), "owner/prep", true).unwrap();
        controller
            .restart(&JobKey("cycle-1/prepare/job".into()))
            .await
            .unwrap();
        assert_eq!(hub.factory_restarts("owner/prep"), 1);
        assert_eq!(controller.stage().await.unwrap(), SpaceStage::Building);
        assert_eq!(
            controller.stage().await.unwrap(),
            SpaceStage::Error("BUILD_ERROR".into())
        );
    }

    #[tokio::test]
    async fn wrong_token_is_denied_and_injected_failures_are_retried() {
        let hub = FakeHub::start_with_token("hf_the_right_one").await;
        hub.add_space("owner/prep", "RUNNING");
        let mut wrong = hub.settings();
        wrong.token = Some(SecretString::from(TOKEN));
        let controller =
            HfSpaceController::new(HubClient::new(wrong).unwrap(), "owner/prep", false).unwrap();
        let err = controller
            .restart(&JobKey("cycle-1/prepare/job".into()))
            .await
            .unwrap_err();
        assert!(matches!(err, PortError::Denied(_)), "{err:?}");
        check_message(&err, "owner/prep");
        assert_eq!(hub.restarts("owner/prep"), 0);

        let controller = HfSpaceController::new(hub.client(), "owner/prep", false).unwrap();
        hub.fail_next(2, 503);
        controller
            .restart(&JobKey("cycle-1/prepare/job".into()))
            .await
            .unwrap();
        assert_eq!(hub.restarts("owner/prep"), 1);
        hub.fail_next(1, 429);
        assert_eq!(controller.stage().await.unwrap(), SpaceStage::Running);
    }
}
