//! `retrain run` with the GitHub Actions workflow trainer, end to end: the
//! real binary against a wiremock GitHub (REST shapes of
//! `shared/reference/external-apis-2.md` §5): dispatch → run found by title →
//! in progress → success → `retrain-result` artifact → gate → promotion into
//! the JSON registry; the next run dispatches nothing.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use retrain_tests::routes::json_route;
use retrain_tests::{Project, Ran};
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const TOKEN: &str = "ghp_cli_workflow_trainer_token";
const RUN_ID: u64 = 16_143_022_347;
const RUNS: &str = "/repos/acme/ml/actions/workflows/train.yml/runs";

/// The job key of the dispatch, as GitHub would put it in the run's title.
type Dispatched = Arc<Mutex<Option<String>>>;

fn run_json(server: &str, key: &str, status: &str, conclusion: Value) -> Value {
    json!({
        "id": RUN_ID, "name": "train", "display_title": format!("retrain seg {key}"),
        "event": "workflow_dispatch", "status": status, "conclusion": conclusion,
        "run_number": 1, "run_attempt": 1, "head_branch": "main",
        "html_url": format!("https://github.com/acme/ml/actions/runs/{RUN_ID}"),
        "url": format!("{server}/repos/acme/ml/actions/runs/{RUN_ID}"),
        "created_at": "2026-03-01T10:00:00Z", "updated_at": "2026-03-01T10:01:00Z",
    })
}

struct Dispatch {
    dispatched: Dispatched,
}

impl Respond for Dispatch {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        let key = body["inputs"]["retrain_job_key"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(body["inputs"]["dataset_version"], "v1");
        assert_eq!(body["inputs"]["label"], "seg");
        *self.dispatched.lock().unwrap() = Some(key);
        ResponseTemplate::new(204)
    }
}

struct Listing {
    dispatched: Dispatched,
    server: String,
}

impl Respond for Listing {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let runs: Vec<Value> = self
            .dispatched
            .lock()
            .unwrap()
            .iter()
            .map(|key| run_json(&self.server, key, "queued", Value::Null))
            .collect();
        ResponseTemplate::new(200)
            .set_body_json(json!({"total_count": runs.len(), "workflow_runs": runs}))
    }
}

/// in_progress first, then completed/success.
struct RunState {
    dispatched: Dispatched,
    server: String,
    reads: AtomicUsize,
}

impl Respond for RunState {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let key = self.dispatched.lock().unwrap().clone().unwrap_or_default();
        let body = if self.reads.fetch_add(1, Ordering::SeqCst) == 0 {
            run_json(&self.server, &key, "in_progress", Value::Null)
        } else {
            run_json(&self.server, &key, "completed", json!("success"))
        };
        ResponseTemplate::new(200).set_body_json(body)
    }
}

fn result_zip() -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    writer
        .start_file(
            "result.json",
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated),
        )
        .unwrap();
    writer
        .write_all(br#"{"candidate": "gh-run-16143022347", "metrics": {"dice": 0.83}}"#)
        .unwrap();
    writer.finish().unwrap().into_inner()
}

async fn fake_github() -> (MockServer, Dispatched) {
    let server = MockServer::start().await;
    let uri = server.uri();
    let dispatched: Dispatched = Arc::default();
    Mock::given(method("POST"))
        .and(path(
            "/repos/acme/ml/actions/workflows/train.yml/dispatches",
        ))
        .respond_with(Dispatch {
            dispatched: dispatched.clone(),
        })
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(RUNS))
        .respond_with(Listing {
            dispatched: dispatched.clone(),
            server: uri.clone(),
        })
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/repos/acme/ml/actions/runs/{RUN_ID}")))
        .respond_with(RunState {
            dispatched: dispatched.clone(),
            server: uri.clone(),
            reads: AtomicUsize::new(0),
        })
        .mount(&server)
        .await;
    let zip = result_zip();
    let answer = json!({
        "total_count": 1,
        "artifacts": [{
            "id": 2_848_401_u64, "name": "retrain-result", "size_in_bytes": zip.len(),
            "archive_download_url": format!("{uri}/repos/acme/ml/actions/artifacts/2848401/zip"),
            "expired": false, "created_at": "2026-03-01T10:01:00Z",
            "expires_at": "2026-03-08T10:01:00Z",
            "workflow_run": {"id": RUN_ID, "head_branch": "main"}
        }]
    });
    json_route(
        "GET",
        format!("/repos/acme/ml/actions/runs/{RUN_ID}/artifacts"),
        200,
        answer,
    )
    .mount(&server)
    .await;
    Mock::given(method("GET"))
        .and(path("/repos/acme/ml/actions/artifacts/2848401/zip"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(zip))
        .mount(&server)
        .await;
    (server, dispatched)
}

fn config(api: &str) -> String {
    format!(
        r#"
state = "sqlite://state.db"
[github]
api_url = "{api}"
token = "{TOKEN}"
[labels.seg]
threshold = 1
counts = "none"
metadata = "dataset_metadata.json"
trainer = {{ github_workflow = {{ repo = "acme/ml", workflow = "train.yml", ref = "main", poll_interval = "1s", timeout = "2m" }} }}
registry = {{ json = "registry.json", model = "seg" }}
gate = {{ require = "all", metrics = [ {{ name = "dice", direction = "higher", min = 0.5 }} ] }}
"#
    )
}

async fn retrain(project: &Project, args: &[&str]) -> Ran {
    let mut command = project.retrain();
    command.args(args);
    Ran::finished(command).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_run_trains_the_candidate_that_is_gated_and_promoted_once() {
    let (server, dispatched) = fake_github().await;
    let project = Project::new();
    project.config(&config(&server.uri())).write(
        "dataset_metadata.json",
        serde_json::to_vec(&json!({
            "dataset_name": "acme/seg-data", "version_tag": "v1", "num_samples": 100,
            "created_at": "2026-03-01T09:00:00Z", "splits": {"train": 100}
        }))
        .unwrap(),
    );

    let first = retrain(&project, &["--output", "json", "run"]).await;
    let report = first.assert_code(0).json();
    let label = &report["labels"][0];
    assert_eq!(label["status"], "promoted", "{label}");
    assert_eq!(label["candidate"]["id"], "gh-run-16143022347", "{label}");
    let key = dispatched.lock().unwrap().clone().expect("dispatched");
    assert!(key.ends_with("/train/1"), "{key}");
    let registry = project.json("registry.json");
    assert_eq!(registry["models"]["seg"]["production"], "1", "{registry}");
    first.assert_hides(TOKEN);

    // Nothing new: no second dispatch (the mock expects exactly one).
    let second = retrain(&project, &["run"]).await;
    second.assert_code(0);
    server.verify().await;
}
