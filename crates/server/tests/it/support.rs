//! `spawn_app()`: a real `Application` on port 0, over SQLite (a temp file)
//! or the real Postgres (`RETRAIN_TEST_POSTGRES_URL`), with local command
//! trainers, driven by a real HTTP client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use retrain_adapters::settings::{load, ConfigSources};
use retrain_adapters::store::{open_run_store, StoreOptions};
use retrain_core::ports::RunStore;
use retrain_server::app::ServeError;
use retrain_server::{Application, ServeOptions};
use serde_json::Value;
use tokio::sync::oneshot;

pub const ADMIN: &str = "admin-token-0123456789";
pub const READER: &str = "reader-token-0123456789";
pub const TRIGGER: &str = "trigger-token-0123456789";
pub const WORKER: &str = "worker-token-0123456789";

/// Appends the label to `starts.log`, sleeps `sleep_<label>` seconds (a
/// file, so a test can make one label slow), reports a candidate.
const TRAIN_SH: &str = r#"
echo "$RETRAIN_LABEL $RETRAIN_JOB_KEY" >> starts.log
sleep "$(cat "sleep_$RETRAIN_LABEL" 2>/dev/null || echo 0)"
printf '{"candidate": "cand-%s", "metrics": {"accuracy": 0.9}}' "$RETRAIN_LABEL" > "$RETRAIN_RESULT"
"#;

/// Artifacts above this size are refused (above the default `body_limit`,
/// 1 MiB, which must not apply to them).
pub const ARTIFACT_MAX_BYTES: u64 = 2 * 1024 * 1024;

fn config(state: &str, root: &Path) -> String {
    let artifacts = root.join("artifacts");
    let artifacts = artifacts.display();
    format!(
        r#"
state = "{state}"
state_dir = ".retrain"

[poll]
interval = "100ms"
timeout = "1m"

[server]
bind = "127.0.0.1:0"
shutdown_timeout = "10s"
artifacts_dir = "{artifacts}"
artifact_max_bytes = {ARTIFACT_MAX_BYTES}

[[server.tokens]]
name = "admin"
env = "ADMIN_TOKEN"
scopes = ["admin"]

[[server.tokens]]
name = "reader"
env = "READER_TOKEN"
scopes = ["read"]

[[server.tokens]]
name = "ci"
env = "TRIGGER_TOKEN"
scopes = ["trigger", "read"]

[[server.tokens]]
name = "worker"
env = "WORKER_TOKEN"
scopes = ["worker"]

[labels.intent]
threshold = 10
counts = "none"
metadata = "file://metadata.json"
trainer = {{ command = ["sh", "train.sh"], timeout = "2m" }}
gate = "none"

[labels.urgency]
threshold = 10
counts = "none"
metadata = "file://metadata.json"
trainer = {{ command = ["sh", "train.sh"], timeout = "2m" }}
gate = "none"

[labels.manual]
threshold = 10
counts = "none"
metadata = "file://metadata.json"
trainer = {{ command = ["sh", "train.sh"], timeout = "2m" }}
registry = {{ json = "registry.json", model = "manual-model" }}
gate = {{ metrics = [{{ name = "accuracy", direction = "higher" }}] }}
promote = "manual"
"#
    )
}

/// Which run store the app uses.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite,
    Postgres(String),
}

impl Store {
    /// A fresh Postgres database, or `None` (skipped locally, failure under CI).
    pub async fn postgres() -> Option<Self> {
        retrain_adapters::testing::services::fresh_postgres_database()
            .await
            .map(Self::Postgres)
    }
}

/// The directory a test app lives in (config, trainer, metadata, SQLite).
#[derive(Debug)]
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub state: String,
}

impl Workspace {
    pub fn new(store: &Store) -> Self {
        Self::with_config(store, |config| config)
    }

    /// A workspace whose `retrain.toml` is the standard one passed through
    /// `edit`.
    pub fn with_config(store: &Store, edit: impl FnOnce(String) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let state = match store {
            Store::Sqlite => format!("sqlite://{}/state.db", root.display()),
            Store::Postgres(url) => url.clone(),
        };
        std::fs::write(root.join("train.sh"), TRAIN_SH).unwrap();
        std::fs::write(root.join("retrain.toml"), edit(config(&state, root))).unwrap();
        std::fs::write(
            root.join("metadata.json"),
            r#"{"dataset_name": "tickets", "version_tag": "v1", "num_samples": 100, "created_at": "2026-01-02T00:00:00Z"}"#,
        )
        .unwrap();
        Self { dir, state }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.root().join("retrain.toml")
    }

    /// Make `label`'s training take `secs` seconds.
    pub fn slow(&self, label: &str, secs: u32) {
        std::fs::write(self.root().join(format!("sleep_{label}")), secs.to_string()).unwrap();
    }

    /// Trainings started, per label.
    pub fn starts(&self, label: &str) -> usize {
        std::fs::read_to_string(self.root().join("starts.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split(' ').next() == Some(label))
            .count()
    }

    pub fn env() -> Vec<(String, String)> {
        [
            ("ADMIN_TOKEN", ADMIN),
            ("READER_TOKEN", READER),
            ("TRIGGER_TOKEN", TRIGGER),
            ("WORKER_TOKEN", WORKER),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    pub async fn store(&self) -> Arc<dyn RunStore> {
        open_run_store(&self.state, StoreOptions::default())
            .await
            .unwrap()
    }
}

/// A running app.
#[derive(Debug)]
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

/// A running app on `workspace` (several apps may share one).
pub async fn spawn_in(workspace: &Workspace) -> TestApp {
    spawn_with(workspace, None).await
}

/// [`spawn_in`] with `extra` routes mounted beside the API's.
pub async fn spawn_with(
    workspace: &Workspace,
    extra: Option<axum::Router<retrain_server::state::AppState>>,
) -> TestApp {
    let sources = ConfigSources {
        file: Some(workspace.config()),
        env: Workspace::env(),
        overrides: Vec::new(),
    };
    let loaded = load(&sources).unwrap();
    let mut app = Application::build(loaded, ServeOptions::default())
        .await
        .unwrap();
    if let Some(extra) = extra {
        app = app.merge_routes(extra);
    }
    let addr = app.addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        client: reqwest::Client::new(),
        stop: Some(stop),
        served: Some(served),
    }
}

/// A workspace and an app on it.
pub async fn spawn_app(store: Store) -> (Workspace, TestApp) {
    let workspace = Workspace::new(&store);
    let app = spawn_in(&workspace).await;
    (workspace, app)
}

impl TestApp {
    /// A client of a server running elsewhere (a `retrain-server` process):
    /// the helpers below work, [`TestApp::shutdown`] does not apply.
    pub fn at(addr: SocketAddr) -> Self {
        Self {
            addr,
            client: reqwest::Client::new(),
            stop: None,
            served: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn get(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(token)
    }

    pub fn post(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(token)
    }

    /// `GET path` with the read-only token; the JSON body, whatever the
    /// status.
    pub async fn read_json(&self, path: &str) -> Value {
        self.get(path, READER)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `POST /v1/runs` for `labels`, answered 202; the body.
    pub async fn trigger(&self, labels: &[&str]) -> Value {
        let response = self
            .post("/v1/runs", TRIGGER)
            .json(&serde_json::json!({ "labels": labels }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        response.json().await.unwrap()
    }

    /// Poll `GET /v1/runs/{id}` until its stage is one of `stages`.
    pub async fn wait_stage(&self, run_id: &str, stages: &[&str]) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let response = self
                .get(&format!("/v1/runs/{run_id}"), READER)
                .send()
                .await
                .unwrap();
            if response.status() == 200 {
                let body: Value = response.json().await.unwrap();
                let stage = body["run"]["stage"].as_str().unwrap_or_default().to_owned();
                if stages.contains(&stage.as_str()) {
                    return body;
                }
            }
            assert!(
                Instant::now() < deadline,
                "run {run_id} never reached {stages:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Signal shutdown and wait for `run_until` (bounded).
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = self
            .served
            .take()
            .expect("shutdown applies to an app of spawn_in, not to TestApp::at");
        tokio::time::timeout(Duration::from_secs(30), served)
            .await
            .expect("the server did not stop within 30 s")
            .unwrap()
    }
}

/// The label's entry of a trigger answer.
pub fn entry<'a>(body: &'a Value, label: &str) -> &'a Value {
    body["labels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["label"] == label)
        .unwrap_or_else(|| panic!("no {label} in {body}"))
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct Sse {
    pub id: u64,
    pub event: String,
    pub data: Value,
}

/// An open event stream.
pub struct SseClient {
    response: reqwest::Response,
    buffer: String,
}

impl std::fmt::Debug for SseClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseClient").finish_non_exhaustive()
    }
}

impl SseClient {
    pub async fn open(app: &TestApp, query: &str, last_event_id: Option<u64>) -> Self {
        let mut request = app.get(&format!("/v1/events{query}"), READER);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (comments skipped), or `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut id = None;
                let mut event = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if let Some(id) = id {
                    return Some(Sse {
                        id,
                        event,
                        data: serde_json::from_str(&data).unwrap(),
                    });
                }
                continue;
            }
            let chunk = self.response.chunk().await.ok()??;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Events until (and including) the first `until` event of `run_id`.
    pub async fn until(&mut self, run_id: &str, until: &str) -> Vec<Sse> {
        let mut events = Vec::new();
        let deadline = Duration::from_secs(60);
        tokio::time::timeout(deadline, async {
            while let Some(event) = self.next().await {
                let done = event.event == until && event.data["run_id"] == run_id;
                events.push(event);
                if done {
                    return;
                }
            }
            panic!("stream ended before {until} of {run_id}");
        })
        .await
        .unwrap_or_else(|_| panic!("no {until} of {run_id} within {deadline:?}: {events:?}"));
        events
    }
}
