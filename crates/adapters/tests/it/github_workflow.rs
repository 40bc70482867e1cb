//! The GitHub Actions workflow trainer against wiremock with GitHub's REST
//! shapes (`shared/reference/external-apis-2.md` §5): workflow dispatch (204),
//! runs listed per workflow with `display_title`, a run's `status` and
//! `conclusion`, its jobs with steps, its artifacts with
//! `archive_download_url` (302 to blob storage on another origin), cancel,
//! and the rate-limit headers.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use retrain_adapters::github_workflow::{
    GithubWorkflowSettings, GithubWorkflowTrainer, HANDLE_KIND,
};
use retrain_adapters::http::HttpPolicy;
use retrain_adapters::testing::routes::{json_route, status_route};
use retrain_core::domain::{JobKey, Label, RunId, TrainingHandle, TrainingOutcome, VersionTag};
use retrain_core::ports::{PortError, Trainer, TrainingRequest};
use secrecy::SecretString;
use serde_json::{json, Value};
use wiremock::matchers::{body_partial_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const TOKEN: &str = "ghp_workflow_trainer_secret_token";
const REPO: &str = "acme/ml";
const RUNS: &str = "/repos/acme/ml/actions/workflows/train.yml/runs";
const DISPATCH: &str = "/repos/acme/ml/actions/workflows/train.yml/dispatches";
const RUN_ID: u64 = 16_143_022_347;

fn request() -> TrainingRequest {
    let run_id = RunId::generate();
    TrainingRequest {
        label: Label::new("seg").unwrap(),
        job_key: JobKey::training(&run_id, 1),
        run_id,
        attempt: 1,
        dataset_name: "acme/seg-data".into(),
        dataset_version: VersionTag::new("v7"),
        lease: None,
        first_start: false,
    }
}

fn trainer(server: &MockServer) -> GithubWorkflowTrainer {
    GithubWorkflowTrainer::new(GithubWorkflowSettings {
        api_url: server.uri(),
        token: SecretString::from(TOKEN),
        repo: REPO.into(),
        workflow: "train.yml".into(),
        git_ref: "main".into(),
        inputs: [("epochs".to_owned(), "20".to_owned())].into(),
        policy: HttpPolicy::fast_for_tests(),
    })
    .unwrap()
    .with_poll_interval(Duration::from_millis(10))
    .with_find_timeout(Duration::from_secs(2))
}

fn html_url(id: u64) -> String {
    format!("https://github.com/{REPO}/actions/runs/{id}")
}

/// A `workflow-run` as GitHub returns it (trimmed of the nested repository
/// objects, which the trainer does not read).
fn run_json(server: &MockServer, id: u64, title: &str, status: &str, conclusion: Value) -> Value {
    let api = format!("{}/repos/{REPO}/actions/runs/{id}", server.uri());
    json!({
        "id": id, "name": "train", "node_id": "WFR_kwLOJxYz0M8AAAAD",
        "head_branch": "main", "head_sha": "9fceb02d0ae598e95dc970b74767f19372d61af8",
        "path": ".github/workflows/train.yml", "display_title": title,
        "run_number": 42, "event": "workflow_dispatch", "status": status,
        "conclusion": conclusion, "workflow_id": 161_335, "check_suite_id": 42,
        "check_suite_node_id": "MDEwOkNoZWNrU3VpdGU0Mg==", "url": api,
        "html_url": html_url(id), "pull_requests": [],
        "created_at": "2026-03-01T10:00:00Z", "updated_at": "2026-03-01T10:05:00Z",
        "actor": {"login": "retrain-bot", "id": 1, "type": "User"},
        "run_attempt": 1, "run_started_at": "2026-03-01T10:00:00Z",
        "jobs_url": format!("{api}/jobs"), "logs_url": format!("{api}/logs"),
        "check_suite_url": format!("{}/repos/{REPO}/check-suites/42", server.uri()),
        "artifacts_url": format!("{api}/artifacts"), "cancel_url": format!("{api}/cancel"),
        "rerun_url": format!("{api}/rerun"), "previous_attempt_url": null,
        "workflow_url": format!("{}/repos/{REPO}/actions/workflows/161335", server.uri()),
    })
}

fn runs_page(runs: Vec<Value>) -> Value {
    json!({ "total_count": runs.len(), "workflow_runs": runs })
}

fn title(key: &JobKey) -> String {
    format!("retrain seg {}", key.as_str())
}

/// A zip holding `files`, deflated as actions/upload-artifact does.
fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in files {
        writer.start_file(*name, options).unwrap();
        writer.write_all(bytes).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

fn artifacts_json(server: &MockServer, run: u64, size: u64) -> Value {
    json!({
        "total_count": 1,
        "artifacts": [{
            "id": 2_848_401_u64, "node_id": "MDg6QXJ0aWZhY3QxMQ==", "name": "retrain-result",
            "size_in_bytes": size,
            "url": format!("{}/repos/{REPO}/actions/artifacts/2848401", server.uri()),
            "archive_download_url": format!("{}/repos/{REPO}/actions/artifacts/2848401/zip", server.uri()),
            "expired": false, "created_at": "2026-03-01T10:04:00Z",
            "expires_at": "2026-03-08T10:04:00Z", "updated_at": "2026-03-01T10:04:00Z",
            "digest": "sha256:cfc3236bdad15b5898bca8408945c9e19e1917da8704adc20eaa618444290a8c",
            "workflow_run": {"id": run, "repository_id": 1296269, "head_repository_id": 1296269,
                             "head_branch": "main", "head_sha": "9fceb02d0ae598e95dc970b74767f19372d61af8"}
        }]
    })
}

/// The run's artifact listing, its `/zip` answering 302 to `blob` (another
/// origin, like GitHub's blob storage), which serves `zip`.
async fn mount_artifact(server: &MockServer, blob: &MockServer, run: u64, zip: Vec<u8>) {
    Mock::given(method("GET"))
        .and(path(format!("/repos/{REPO}/actions/runs/{run}/artifacts")))
        .and(query_param("name", "retrain-result"))
        .respond_with(ResponseTemplate::new(200).set_body_json(artifacts_json(
            server,
            run,
            zip.len() as u64,
        )))
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/repos/{REPO}/actions/artifacts/2848401/zip")))
        .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
        .respond_with(ResponseTemplate::new(302).insert_header(
            "location",
            format!("{}/artifact-blob/2848401.zip?sig=short-lived", blob.uri()).as_str(),
        ))
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path("/artifact-blob/2848401.zip"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "application/zip")
                .set_body_bytes(zip),
        )
        .mount(blob)
        .await;
}

/// Answers the run with `states` in turn (the last one from then on).
struct RunStates {
    states: Vec<Value>,
    calls: AtomicUsize,
}

impl Respond for RunStates {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        ResponseTemplate::new(200).set_body_json(&self.states[n.min(self.states.len() - 1)])
    }
}

async fn mount_run_states(server: &MockServer, run: u64, states: Vec<Value>) {
    Mock::given(method("GET"))
        .and(path(format!("/repos/{REPO}/actions/runs/{run}")))
        .respond_with(RunStates {
            states,
            calls: AtomicUsize::new(0),
        })
        .mount(server)
        .await;
}

/// Run [`RUN_ID`] of `request`'s job, always in one state.
async fn mount_run_state(
    server: &MockServer,
    request: &TrainingRequest,
    status: &str,
    conclusion: Value,
) {
    let state = run_json(server, RUN_ID, &title(&request.job_key), status, conclusion);
    mount_run_states(server, RUN_ID, vec![state]).await;
}

/// The runs listing: empty until `dispatched`, then the run titled with the
/// key (plus a run of another job whose key merely starts with ours).
struct Listing {
    dispatched: Arc<AtomicBool>,
    before: Value,
    after: Value,
}

impl Respond for Listing {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let body = if self.dispatched.load(Ordering::SeqCst) {
            &self.after
        } else {
            &self.before
        };
        ResponseTemplate::new(200).set_body_json(body)
    }
}

/// A dispatch that makes the run appear, answering `status`.
struct Dispatch {
    dispatched: Arc<AtomicBool>,
    status: u16,
}

impl Respond for Dispatch {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.dispatched.store(true, Ordering::SeqCst);
        ResponseTemplate::new(self.status)
    }
}

async fn mount_listing(server: &MockServer, key: &JobKey, dispatched: Arc<AtomicBool>) {
    let other_key = format!("{}0", key.as_str());
    Mock::given(method("GET"))
        .and(path(RUNS))
        .and(query_param("event", "workflow_dispatch"))
        .respond_with(Listing {
            dispatched,
            before: runs_page(vec![run_json(
                server,
                RUN_ID - 5,
                &format!("retrain seg {other_key}"),
                "completed",
                json!("success"),
            )]),
            after: runs_page(vec![
                run_json(server, RUN_ID, &title(key), "queued", Value::Null),
                run_json(
                    server,
                    RUN_ID - 5,
                    &format!("retrain seg {other_key}"),
                    "completed",
                    json!("success"),
                ),
            ]),
        })
        .mount(server)
        .await;
}

/// The listing of `req`'s key ([`mount_listing`]) and one dispatch that
/// creates the run and answers `status`.
async fn mount_listing_and_dispatch(server: &MockServer, req: &TrainingRequest, status: u16) {
    let dispatched = Arc::new(AtomicBool::new(false));
    mount_listing(server, &req.job_key, dispatched.clone()).await;
    Mock::given(method("POST"))
        .and(path(DISPATCH))
        .respond_with(Dispatch { dispatched, status })
        .expect(1)
        .mount(server)
        .await;
}

fn handle_run_id(handle: &TrainingHandle) -> u64 {
    assert_eq!(handle.kind, HANDLE_KIND);
    handle.data["run_id"].as_u64().unwrap()
}

fn finished(outcome: TrainingOutcome) -> retrain_core::domain::Candidate {
    match outcome {
        TrainingOutcome::Finished(candidate) => candidate,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn dispatch_find_the_run_by_title_poll_to_success_and_read_the_result_artifact() {
    let server = MockServer::start().await;
    let blob = MockServer::start().await;
    let req = request();
    let dispatched = Arc::new(AtomicBool::new(false));
    mount_listing(&server, &req.job_key, dispatched.clone()).await;
    Mock::given(method("POST"))
        .and(path(DISPATCH))
        .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
        .and(header("x-github-api-version", "2022-11-28"))
        .and(header("accept", "application/vnd.github+json"))
        .and(body_partial_json(json!({
            "ref": "main",
            "inputs": {
                "epochs": "20",
                "retrain_job_key": req.job_key.as_str(),
                "dataset_name": "acme/seg-data",
                "dataset_version": "v7",
                "label": "seg",
            }
        })))
        .respond_with(Dispatch {
            dispatched: dispatched.clone(),
            status: 204,
        })
        .expect(1)
        .mount(&server)
        .await;
    let key = title(&req.job_key);
    mount_run_states(
        &server,
        RUN_ID,
        vec![
            run_json(&server, RUN_ID, &key, "queued", Value::Null),
            run_json(&server, RUN_ID, &key, "in_progress", Value::Null),
            run_json(&server, RUN_ID, &key, "completed", json!("success")),
        ],
    )
    .await;
    let result = br#"{"candidate": "runs:/abc/model", "metrics": {"dice": 0.83, "iou": NaN}}"#;
    mount_artifact(&server, &blob, RUN_ID, zip_of(&[("result.json", result)])).await;

    let trainer = trainer(&server);
    let handle = trainer.start(&req).await.unwrap();
    assert_eq!(
        handle_run_id(&handle),
        RUN_ID,
        "the run titled with our key, not the …/train/10 one"
    );
    assert_eq!(handle.data["html_url"], html_url(RUN_ID));
    let candidate = finished(trainer.wait(&req, &handle).await.unwrap());
    assert_eq!(candidate.id, "runs:/abc/model");
    assert_eq!(candidate.metrics["dice"], 0.83);
    assert!(
        candidate.metrics["iou"].is_nan(),
        "same §6 parser as the command trainer"
    );

    // The listing asked for dispatches since the run began (minus skew).
    let requests = server.received_requests().await.unwrap();
    let listing = requests
        .iter()
        .find(|r| r.url.path() == RUNS)
        .expect("listed runs");
    let created = listing
        .url
        .query_pairs()
        .find(|(k, _)| k == "created")
        .map(|(_, v)| v.into_owned())
        .expect("created filter");
    let since = chrono::DateTime::parse_from_rfc3339(created.strip_prefix(">=").unwrap()).unwrap();
    let age = chrono::Utc::now().signed_duration_since(since);
    assert!(
        age >= chrono::Duration::minutes(9) && age <= chrono::Duration::minutes(11),
        "{created}"
    );
    // The token went to the API only, never to blob storage.
    let blob_requests = blob.received_requests().await.unwrap();
    assert_eq!(blob_requests.len(), 1);
    assert!(
        !blob_requests[0].headers.contains_key("authorization"),
        "the token must not follow the redirect to blob storage"
    );
}

#[tokio::test]
async fn a_second_start_with_the_same_key_adopts_the_run_and_never_dispatches_again() {
    let server = MockServer::start().await;
    let req = request();
    // The run was dispatched by an earlier process (crash before its
    // journal write): the listing already shows it.
    mount_listing(&server, &req.job_key, Arc::new(AtomicBool::new(true))).await;
    status_route("POST", DISPATCH, 204)
        .expect(0)
        .mount(&server)
        .await;
    let trainer = trainer(&server);
    let first = trainer.start(&req).await.unwrap();
    let second = trainer.start(&req).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(handle_run_id(&first), RUN_ID);
}

/// A first start (the engine has just journaled the intent) cannot find a
/// run to adopt: it dispatches without listing the runs first, and lists
/// them only to find the run its dispatch created.
#[tokio::test]
async fn a_first_start_dispatches_without_listing_the_runs_first() {
    let server = MockServer::start().await;
    let mut req = request();
    req.first_start = true;
    mount_listing_and_dispatch(&server, &req, 204).await;
    let handle = trainer(&server).start(&req).await.unwrap();
    assert_eq!(handle_run_id(&handle), RUN_ID);
    let calls: Vec<(String, String)> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| (r.method.to_string(), r.url.path().to_string()))
        .collect();
    assert_eq!(
        calls.first(),
        Some(&("POST".to_string(), DISPATCH.to_string())),
        "{calls:?}"
    );
    assert!(
        calls[1..].iter().all(|(m, p)| m == "GET" && p == RUNS),
        "{calls:?}"
    );
}

#[tokio::test]
async fn a_lost_dispatch_answer_adopts_the_run_it_created_instead_of_dispatching_again() {
    let server = MockServer::start().await;
    let req = request();
    // GitHub created the run but the answer was a 502.
    mount_listing_and_dispatch(&server, &req, 502).await;
    let handle = trainer(&server).start(&req).await.unwrap();
    assert_eq!(handle_run_id(&handle), RUN_ID);
}

#[tokio::test]
async fn a_dispatch_whose_run_never_shows_up_says_the_run_name_must_carry_the_key() {
    let server = MockServer::start().await;
    let req = request();
    Mock::given(method("GET"))
        .and(path(RUNS))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(runs_page(vec![run_json(
                &server,
                RUN_ID,
                "train",
                "queued",
                Value::Null,
            )])),
        )
        .mount(&server)
        .await;
    status_route("POST", DISPATCH, 204)
        .expect(1)
        .mount(&server)
        .await;
    let err = trainer(&server)
        .with_find_timeout(Duration::from_millis(200))
        .start(&req)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    assert!(text.contains("run-name"), "{text}");
    assert!(text.contains("inputs.retrain_job_key"), "{text}");
    assert!(text.contains(req.job_key.as_str()), "{text}");
}

#[tokio::test]
async fn a_workflow_without_the_inputs_is_a_clear_422() {
    let server = MockServer::start().await;
    let req = request();
    json_route("GET", RUNS, 200, runs_page(vec![]))
        .mount(&server)
        .await;
    let answer = json!({
        "message": "Unexpected inputs provided: [\"retrain_job_key\"]",
        "documentation_url": "https://docs.github.com/rest/actions/workflows#create-a-workflow-dispatch-event",
        "status": "422"
    });
    json_route("POST", DISPATCH, 422, answer)
        .expect(1)
        .mount(&server)
        .await;
    let err = trainer(&server).start(&req).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("Unexpected inputs provided"), "{text}");
    assert!(text.contains("workflow_dispatch"), "{text}");
    assert!(text.contains("retrain_job_key"), "{text}");
}

fn jobs_json(run: u64) -> Value {
    let job = |id: u64, name: &str, conclusion: &str, steps: Value| {
        json!({
            "id": id, "run_id": run, "workflow_name": "train", "head_branch": "main",
            "run_url": format!("https://api.github.com/repos/{REPO}/actions/runs/{run}"),
            "run_attempt": 1, "node_id": "CR_kwDOABCD", "head_sha": "9fceb02d",
            "url": format!("https://api.github.com/repos/{REPO}/actions/jobs/{id}"),
            "html_url": format!("https://github.com/{REPO}/actions/runs/{run}/job/{id}"),
            "status": "completed", "conclusion": conclusion,
            "created_at": "2026-03-01T10:00:00Z", "started_at": "2026-03-01T10:00:05Z",
            "completed_at": "2026-03-01T10:03:00Z", "name": name, "steps": steps,
            "check_run_url": format!("https://api.github.com/repos/{REPO}/check-runs/{id}"),
            "labels": ["ubuntu-latest"], "runner_id": 1, "runner_name": "GitHub Actions 1",
            "runner_group_id": 1, "runner_group_name": "GitHub Actions",
        })
    };
    let step = |n: u64, name: &str, conclusion: &str| {
        json!({"name": name, "status": "completed", "conclusion": conclusion, "number": n,
               "started_at": "2026-03-01T10:00:05Z", "completed_at": "2026-03-01T10:01:00Z"})
    };
    json!({
        "total_count": 2,
        "jobs": [
            job(101, "lint", "success", json!([step(1, "Set up job", "success")])),
            job(102, "train", "failure", json!([
                step(1, "Set up job", "success"),
                step(2, "Run actions/checkout@v4", "success"),
                step(3, "Train", "failure"),
                step(4, "Upload result", "skipped"),
            ])),
        ]
    })
}

#[tokio::test]
async fn a_failed_run_fails_with_its_url_and_the_failing_job_and_step() {
    let server = MockServer::start().await;
    let req = request();
    mount_listing(&server, &req.job_key, Arc::new(AtomicBool::new(true))).await;
    mount_run_states(
        &server,
        RUN_ID,
        vec![
            run_json(
                &server,
                RUN_ID,
                &title(&req.job_key),
                "in_progress",
                Value::Null,
            ),
            run_json(
                &server,
                RUN_ID,
                &title(&req.job_key),
                "completed",
                json!("failure"),
            ),
        ],
    )
    .await;
    Mock::given(method("GET"))
        .and(path(format!("/repos/{REPO}/actions/runs/{RUN_ID}/jobs")))
        .and(query_param("filter", "latest"))
        .respond_with(ResponseTemplate::new(200).set_body_json(jobs_json(RUN_ID)))
        .mount(&server)
        .await;
    status_route(
        "GET",
        format!("/repos/{REPO}/actions/runs/{RUN_ID}/artifacts"),
        200,
    )
    .expect(0)
    .mount(&server)
    .await;
    let trainer = trainer(&server);
    let handle = trainer.start(&req).await.unwrap();
    let err = trainer.wait(&req, &handle).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    assert!(text.contains(&html_url(RUN_ID)), "{text}");
    assert!(text.contains("`failure`"), "{text}");
    assert!(
        text.contains("job `train` failure at step `Train`"),
        "{text}"
    );
    assert!(text.contains("/job/102"), "{text}");
}

#[tokio::test]
async fn a_deleted_run_is_lost() {
    let server = MockServer::start().await;
    let req = request();
    mount_listing(&server, &req.job_key, Arc::new(AtomicBool::new(true))).await;
    let answer = json!({
        "message": "Not Found",
        "documentation_url": "https://docs.github.com/rest/actions/workflow-runs#get-a-workflow-run",
        "status": "404"
    });
    json_route(
        "GET",
        format!("/repos/{REPO}/actions/runs/{RUN_ID}"),
        404,
        answer,
    )
    .mount(&server)
    .await;
    let trainer = trainer(&server);
    let handle = trainer.start(&req).await.unwrap();
    match trainer.wait(&req, &handle).await.unwrap() {
        TrainingOutcome::Lost { reason } => assert!(reason.contains(&html_url(RUN_ID)), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn cancel_posts_cancel_and_a_409_on_a_finished_run_is_success() {
    let server = MockServer::start().await;
    let req = request();
    mount_listing(&server, &req.job_key, Arc::new(AtomicBool::new(true))).await;
    let trainer = trainer(&server);
    let handle = trainer.start(&req).await.unwrap();
    let cancel = format!("/repos/{REPO}/actions/runs/{RUN_ID}/cancel");

    Mock::given(method("POST"))
        .and(path(cancel.as_str()))
        .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
        .respond_with(ResponseTemplate::new(202).set_body_json(json!({})))
        .expect(1)
        .mount(&server)
        .await;
    trainer.cancel(&handle).await.unwrap();
    server.verify().await;

    // Already finished: GitHub answers 409, which is success.
    server.reset().await;
    json_route(
        "POST",
        cancel.as_str(),
        409,
        json!({
            "message": "Cannot cancel a workflow run that is completed.",
            "documentation_url": "https://docs.github.com/rest/actions/workflow-runs#cancel-a-workflow-run",
            "status": "409"
        }),
    )
    .mount(&server)
    .await;
    mount_run_state(&server, &req, "completed", json!("success")).await;
    trainer.cancel(&handle).await.unwrap();

    // A 409 while the run still runs is a failure, naming the run.
    server.reset().await;
    status_route("POST", cancel.as_str(), 409)
        .mount(&server)
        .await;
    mount_run_state(&server, &req, "in_progress", Value::Null).await;
    let err = trainer.cancel(&handle).await.unwrap_err();
    assert!(err.to_string().contains(&html_url(RUN_ID)), "{err}");
    assert!(err.to_string().contains("in_progress"), "{err}");
}

/// A trainer whose run has already succeeded, with `zip` as its artifact.
async fn succeeded_with(
    server: &MockServer,
    blob: &MockServer,
    zip: Vec<u8>,
) -> (GithubWorkflowTrainer, TrainingRequest, TrainingHandle) {
    let req = request();
    mount_listing(server, &req.job_key, Arc::new(AtomicBool::new(true))).await;
    mount_run_states(
        server,
        RUN_ID,
        vec![run_json(
            server,
            RUN_ID,
            &title(&req.job_key),
            "completed",
            json!("success"),
        )],
    )
    .await;
    mount_artifact(server, blob, RUN_ID, zip).await;
    let trainer = trainer(server);
    let handle = trainer.start(&req).await.unwrap();
    (trainer, req, handle)
}

#[tokio::test]
async fn oversized_artifacts_are_refused() {
    // Declared too big: refused before any download.
    let server = MockServer::start().await;
    let blob = MockServer::start().await;
    let zip = zip_of(&[("result.json", br#"{"candidate":"c","metrics":{}}"#)]);
    let (trainer, req, handle) = succeeded_with(&server, &blob, zip.clone()).await;
    let trainer = trainer.with_artifact_limit(zip.len() as u64 - 1);
    let err = trainer.wait(&req, &handle).await.unwrap_err();
    assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
    assert!(err.to_string().contains("over the"), "{err}");
    assert!(
        blob.received_requests().await.unwrap().is_empty(),
        "nothing downloaded"
    );

    // A result.json that inflates past 1 MiB (a zip bomb) is refused too.
    let server = MockServer::start().await;
    let blob = MockServer::start().await;
    let mut huge = br#"{"candidate":"c","metrics":{},"padding":""#.to_vec();
    huge.extend(std::iter::repeat_n(b' ', 3 << 20));
    huge.extend_from_slice(b"\"}");
    let bomb = zip_of(&[("result.json", &huge)]);
    assert!(bomb.len() < 64 << 10, "compresses well: {}", bomb.len());
    let (trainer, req, handle) = succeeded_with(&server, &blob, bomb).await;
    let err = trainer.wait(&req, &handle).await.unwrap_err();
    assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
    assert!(err.to_string().contains("1 MiB"), "{err}");
}

#[tokio::test]
async fn a_malformed_result_is_refused_naming_the_field() {
    let server = MockServer::start().await;
    let blob = MockServer::start().await;
    let zip = zip_of(&[(
        "result.json",
        br#"{"candidate":"c","metrics":{"dice":"high"}}"#,
    )]);
    let (trainer, req, handle) = succeeded_with(&server, &blob, zip).await;
    let err = trainer.wait(&req, &handle).await.unwrap_err();
    assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("metric `dice`"), "{text}");
    assert!(text.contains("retrain-result"), "{text}");
    assert!(text.contains(&html_url(RUN_ID)), "{text}");

    // No result.json at the root: the error lists what the zip holds.
    let server = MockServer::start().await;
    let blob = MockServer::start().await;
    let zip = zip_of(&[("out/result.json", b"{}"), ("model.pt", b"weights")]);
    let (trainer, req, handle) = succeeded_with(&server, &blob, zip).await;
    let err = trainer.wait(&req, &handle).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("no `result.json` at its root"), "{text}");
    assert!(text.contains("out/result.json"), "{text}");

    // Not a zip at all.
    let server = MockServer::start().await;
    let blob = MockServer::start().await;
    let (trainer, req, handle) = succeeded_with(&server, &blob, b"<html>".to_vec()).await;
    let err = trainer.wait(&req, &handle).await.unwrap_err();
    assert!(err.to_string().contains("not a readable zip"), "{err}");
}

#[tokio::test]
async fn a_successful_run_without_the_artifact_says_what_to_upload() {
    let server = MockServer::start().await;
    let req = request();
    mount_listing(&server, &req.job_key, Arc::new(AtomicBool::new(true))).await;
    mount_run_state(&server, &req, "completed", json!("success")).await;
    Mock::given(method("GET"))
        .and(path(format!(
            "/repos/{REPO}/actions/runs/{RUN_ID}/artifacts"
        )))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"total_count": 0, "artifacts": []})),
        )
        .mount(&server)
        .await;
    let trainer = trainer(&server);
    let handle = trainer.start(&req).await.unwrap();
    let err = trainer.wait(&req, &handle).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("no artifact named `retrain-result`"),
        "{text}"
    );
    assert!(text.contains("actions/upload-artifact"), "{text}");
}

#[tokio::test]
async fn rate_limits_are_waited_out_then_the_job_succeeds() {
    let server = MockServer::start().await;
    let blob = MockServer::start().await;
    let req = request();
    let reset = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1;
    // Primary limit on the first listing: 403 with remaining 0 and a reset.
    Mock::given(method("GET"))
        .and(path(RUNS))
        .respond_with(
            ResponseTemplate::new(403)
                .insert_header("x-ratelimit-limit", "1000")
                .insert_header("x-ratelimit-remaining", "0")
                .insert_header("x-ratelimit-used", "1000")
                .insert_header("x-ratelimit-reset", reset.to_string().as_str())
                .insert_header("x-ratelimit-resource", "core")
                .set_body_json(json!({
                    "message": "API rate limit exceeded for installation ID 1.",
                    "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api",
                    "status": "403"
                })),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    let dispatched = Arc::new(AtomicBool::new(false));
    mount_listing(&server, &req.job_key, dispatched.clone()).await;
    // Secondary limit on the dispatch: 429 with retry-after; it did not
    // dispatch, so it is sent again (a POST, but provably not applied).
    Mock::given(method("POST"))
        .and(path(DISPATCH))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1").set_body_json(
            json!({"message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
                   "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"}),
        ))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(DISPATCH))
        .respond_with(Dispatch {
            dispatched,
            status: 204,
        })
        .expect(1)
        .mount(&server)
        .await;
    // And a secondary limit (403 + retry-after) while polling.
    Mock::given(method("GET"))
        .and(path(format!("/repos/{REPO}/actions/runs/{RUN_ID}")))
        .respond_with(ResponseTemplate::new(403).insert_header("retry-after", "1"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    mount_run_state(&server, &req, "completed", json!("success")).await;
    mount_artifact(
        &server,
        &blob,
        RUN_ID,
        zip_of(&[(
            "result.json",
            br#"{"candidate":"c7","metrics":{"dice":0.9}}"#,
        )]),
    )
    .await;
    let started = Instant::now();
    let trainer = trainer(&server);
    let handle = trainer.start(&req).await.unwrap();
    let candidate = finished(trainer.wait(&req, &handle).await.unwrap());
    assert_eq!(candidate.id, "c7");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "three waits of about a second"
    );
}

#[tokio::test]
async fn the_token_is_never_in_errors_or_debug() {
    let server = MockServer::start().await;
    let req = request();
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({
            "message": "Bad credentials",
            "documentation_url": "https://docs.github.com/rest",
            "status": "401"
        })))
        .mount(&server)
        .await;
    let trainer = trainer(&server);
    let err = trainer.start(&req).await.unwrap_err();
    assert!(matches!(err, PortError::Denied(_)), "{err:?}");
    let text = format!("{err} {err:?} {trainer:?}");
    assert!(text.contains("actions: write"), "{text}");
    assert!(!text.contains(TOKEN), "{text}");
    assert_eq!(
        trainer.describe(),
        "github-workflow://acme/ml/train.yml@main"
    );
}
