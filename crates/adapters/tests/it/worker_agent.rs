//! The worker agent against a wiremock server implementing the worker HTTP
//! contract (docs/workers.md): real `sh` jobs, real process groups.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use retrain_adapters::http::HttpPolicy;
use retrain_adapters::worker_agent::{AgentConfig, Resources, WorkerAgent};
use retrain_core::CancellationToken;
use secrecy::SecretString;
use serde_json::{json, Value};
use sha2::Digest;
use wiremock::matchers::{header, method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const TOKEN: &str = "worker-t0ken-value";
const RUN: &str = "run-7";
const KEY: &str = "run-7/train/1";

/// `POST /v1/workers`: worker ids w-1, w-2, … in order.
struct Register(AtomicUsize);

impl Respond for Register {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        ResponseTemplate::new(201).set_body_json(json!({
            "worker_id": format!("w-{n}"),
            "heartbeat_interval_secs": 1,
            "worker_ttl_secs": 60,
        }))
    }
}

/// `lease-job`: the queued jobs one by one, then `204` after a short poll.
struct Lease(Mutex<VecDeque<Value>>);

impl Respond for Lease {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        match self.0.lock().unwrap().pop_front() {
            Some(job) => ResponseTemplate::new(200).set_body_json(job),
            None => ResponseTemplate::new(204).set_delay(Duration::from_millis(200)),
        }
    }
}

/// Heartbeats: `cancel` names the running job when `kill_running` is set.
struct Heartbeat {
    kill_running: bool,
}

impl Respond for Heartbeat {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        let cancel = match (&body["job_key"], self.kill_running) {
            (Value::String(key), true) => vec![key.clone()],
            _ => vec![],
        };
        ResponseTemplate::new(200).set_body_json(json!({ "cancel": cancel }))
    }
}

/// `PUT …/artifacts/{name}`: answers with the received bytes' size and hash.
struct StoreArtifact;

impl Respond for StoreArtifact {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let name = request.url.path().rsplit('/').next().unwrap().to_owned();
        ResponseTemplate::new(201).set_body_json(json!({
            "name": name,
            "size_bytes": request.body.len(),
            "sha256": hex::encode(sha2::Sha256::digest(&request.body)),
        }))
    }
}

fn job(script: &str, env: Value) -> Value {
    json!({
        "job_key": KEY,
        "run_id": RUN,
        "label": "segmentation",
        "attempt": 1,
        "dataset": {"name": "owner/wms", "version": "v20251030_115250"},
        "command": ["sh", "-c", script],
        "env": env,
        "timeout_secs": 120,
        "results_url": format!("/v1/runs/{RUN}/results"),
        "logs_url": format!("/v1/runs/{RUN}/logs"),
        "artifacts_url": format!("/v1/runs/{RUN}/artifacts"),
    })
}

/// A server following the contract, with `jobs` queued for the first leases.
async fn contract_server(jobs: Vec<Value>, kill_running: bool) -> MockServer {
    let server = MockServer::start().await;
    let bearer = format!("Bearer {TOKEN}");
    let auth = || header("authorization", bearer.as_str());
    Mock::given(method("POST"))
        .and(path("/v1/workers"))
        .and(auth())
        .respond_with(Register(AtomicUsize::new(0)))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/v1/workers/w-\d+/heartbeat$"))
        .and(auth())
        .respond_with(Heartbeat { kill_running })
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/v1/workers/w-\d+/lease-job$"))
        .and(auth())
        .respond_with(Lease(Mutex::new(jobs.into())))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("/v1/runs/{RUN}/logs")))
        .and(auth())
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("/v1/runs/{RUN}/results")))
        .and(auth())
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"accepted": true})))
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path_regex(format!(r"^/v1/runs/{RUN}/artifacts/[^/]+$")))
        .and(auth())
        .respond_with(StoreArtifact)
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path_regex(r"^/v1/workers/w-\d+$"))
        .and(auth())
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    server
}

fn config(server: &MockServer, work_dir: &Path, drain_timeout: Duration) -> AgentConfig {
    AgentConfig {
        server: server.uri(),
        token: SecretString::from(TOKEN),
        name: "gpu-box".into(),
        hostname: "gpu-box.lab".into(),
        labels: vec!["segmentation".into()],
        resources: Resources {
            cpus: 4,
            memory_bytes: 8 << 30,
            gpus: 1,
            gpu_memory_bytes: 24 << 30,
            gpu_names: vec!["NVIDIA L4".into()],
            tags: vec!["l4".into()],
        },
        work_dir: work_dir.to_path_buf(),
        drain_timeout,
        lease_wait_secs: 1,
        http: HttpPolicy::fast_for_tests(),
        hidden_env: vec![],
    }
}

type AgentTask = tokio::task::JoinHandle<Result<(), retrain_adapters::worker_agent::AgentError>>;

/// Start the agent; returns its drain token and task.
fn start(config: AgentConfig) -> (CancellationToken, AgentTask) {
    let drain = CancellationToken::new();
    let agent = WorkerAgent::new(config).unwrap();
    let task = tokio::spawn(agent.run(drain.clone()));
    (drain, task)
}

/// The requests `server` received for `method` on a path matching `pred`.
async fn requests(server: &MockServer, verb: &str, pred: impl Fn(&str) -> bool) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.method.as_str() == verb && pred(r.url.path()))
        .collect()
}

/// Wait (up to 20 s) until `server` received a matching request.
async fn until(
    server: &MockServer,
    verb: &str,
    pred: impl Fn(&str) -> bool + Copy,
) -> Vec<Request> {
    for _ in 0..200 {
        let found = requests(server, verb, pred).await;
        if !found.is_empty() {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen: Vec<String> = server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| format!("{} {}", r.method, r.url.path()))
        .collect();
    panic!("no {verb} request matched within 20s; received: {seen:#?}");
}

fn body(request: &Request) -> Value {
    serde_json::from_slice(&request.body).unwrap()
}

fn logs(server_requests: &[Request]) -> String {
    server_requests
        .iter()
        .map(|r| body(r)["chunk"].as_str().unwrap().to_owned())
        .collect()
}

async fn finish(drain: CancellationToken, task: AgentTask) {
    drain.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the agent stops after draining")
        .unwrap()
        .expect("the agent ends without error");
}

fn is_results(p: &str) -> bool {
    p == format!("/v1/runs/{RUN}/results")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_like_a_command_trainer_and_reports_logs_result_and_artifacts() {
    let script = r#"
        echo "training $RETRAIN_LABEL on $RETRAIN_DATASET_NAME@$RETRAIN_DATASET_VERSION attempt $RETRAIN_ATTEMPT key $RETRAIN_JOB_KEY"
        echo "epochs=$EPOCHS token=$HF_TOKEN" >&2
        printf 'weights-\001\002' > "$RETRAIN_ARTIFACTS_DIR/model.bin"
        printf '{"val": 1}' > "$RETRAIN_ARTIFACTS_DIR/metrics.json"
        printf x > "$RETRAIN_ARTIFACTS_DIR/bad name"
        sleep 1
        printf '{"candidate": "cand-42", "metrics": {"dice": 0.81, "loss": NaN}}' > "$RETRAIN_RESULT"
        echo done
    "#;
    let env = json!({"EPOCHS": "20", "HF_TOKEN": "hf_job_s3cret_value"});
    let server = contract_server(vec![job(script, env)], false).await;
    let work = tempfile::tempdir().unwrap();
    let (drain, task) = start(config(&server, work.path(), Duration::from_secs(30)));

    let registration = until(&server, "POST", |p| p == "/v1/workers").await;
    let registered = body(&registration[0]);
    assert_eq!(registered["name"], "gpu-box");
    assert_eq!(registered["hostname"], "gpu-box.lab");
    assert_eq!(registered["labels"], json!(["segmentation"]));
    assert_eq!(
        registered["resources"],
        json!({"cpus": 4, "memory_bytes": 8u64 << 30, "gpus": 1, "gpu_memory_bytes": 24u64 << 30,
               "gpu_names": ["NVIDIA L4"], "tags": ["l4"]})
    );
    assert!(registered["version"].is_string());
    let lease = until(&server, "POST", |p| p == "/v1/workers/w-1/lease-job").await;
    assert_eq!(body(&lease[0]), json!({"wait_secs": 1}));

    // Drain while the job runs: it finishes (well within the drain timeout).
    until(&server, "POST", |p| p.ends_with("/logs")).await;
    drain.cancel();
    let results = until(&server, "POST", is_results).await;
    assert_eq!(results.len(), 1);
    let text = String::from_utf8(results[0].body.clone()).unwrap();
    assert!(text.contains(r#""loss":NaN"#), "{text}");
    let expected = r#"{"job_key":"run-7/train/1","worker_id":"w-1","candidate":"cand-42","metrics":{"dice":0.81,"loss":NaN}}"#;
    assert_eq!(text, expected);
    finish(drain, task).await;

    let chunks = requests(&server, "POST", |p| p.ends_with("/logs")).await;
    for chunk in &chunks {
        let b = body(chunk);
        assert_eq!(
            (b["job_key"].as_str(), b["worker_id"].as_str()),
            (Some(KEY), Some("w-1"))
        );
    }
    let log = logs(&chunks);
    assert!(
        log.contains(
            "training segmentation on owner/wms@v20251030_115250 attempt 1 key run-7/train/1"
        ),
        "{log}"
    );
    assert!(
        log.contains("epochs=20 token=***"),
        "secrets are scrubbed: {log}"
    );
    assert!(!log.contains("hf_job_s3cret_value"));
    assert!(
        log.ends_with("done\n"),
        "the output after the result is flushed: {log}"
    );

    let mut puts = requests(&server, "PUT", |_| true).await;
    puts.sort_by_key(|r| r.url.path().to_owned());
    let uploaded: Vec<(&str, &[u8])> = puts
        .iter()
        .map(|r| (r.url.path(), r.body.as_slice()))
        .collect();
    assert_eq!(
        uploaded,
        [
            (
                "/v1/runs/run-7/artifacts/metrics.json",
                &b"{\"val\": 1}"[..]
            ),
            (
                "/v1/runs/run-7/artifacts/model.bin",
                &b"weights-\x01\x02"[..]
            ),
        ]
    );

    let deleted = requests(&server, "DELETE", |p| p == "/v1/workers/w-1").await;
    assert_eq!(deleted.len(), 1, "the worker deregisters after draining");
    assert!(
        !work.path().join("jobs").join("run-7_train_1").exists(),
        "the job's directory is removed once reported"
    );
    // The token is never sent anywhere but the Authorization header.
    for request in server.received_requests().await.unwrap() {
        assert!(!String::from_utf8_lossy(&request.body).contains(TOKEN));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_reports_its_exit_status_and_stderr_tail() {
    let script = "echo 'loading data'; echo 'CUDA out of memory' >&2; exit 3";
    let server = contract_server(vec![job(script, json!({}))], false).await;
    let work = tempfile::tempdir().unwrap();
    let (drain, task) = start(config(&server, work.path(), Duration::from_secs(30)));
    let results = until(&server, "POST", is_results).await;
    let report = body(&results[0]);
    assert_eq!(report["job_key"], KEY);
    assert_eq!(report["worker_id"], "w-1");
    assert_eq!(report["failed"]["exit_status"], "exit status 3");
    let message = report["failed"]["message"].as_str().unwrap();
    assert!(
        message.contains("exit status 3") && message.contains("CUDA out of memory"),
        "{message}"
    );
    assert!(report.get("candidate").is_none());
    finish(drain, task).await;
    assert!(
        requests(&server, "PUT", |_| true).await.is_empty(),
        "no artifacts after a failure"
    );
}

/// Whether `pid` is a running (non-zombie) process.
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A job that leaves a background child and records its pid.
fn long_job(pid_file: &Path) -> Value {
    let script = format!(
        "sleep 300 & echo $! > {}; echo started; wait",
        pid_file.display()
    );
    job(&script, json!({}))
}

async fn child_pid(pid_file: &Path) -> u32 {
    for _ in 0..100 {
        if let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the job did not start");
}

async fn until_dead(pid: u32) {
    for _ in 0..100 {
        if !running(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("process {pid} of the job's group is still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_in_a_heartbeat_answer_kills_the_jobs_process_group() {
    let scratch = tempfile::tempdir().unwrap();
    let pid_file = scratch.path().join("child.pid");
    let server = contract_server(vec![long_job(&pid_file)], true).await;
    let work = tempfile::tempdir().unwrap();
    let (drain, task) = start(config(&server, work.path(), Duration::from_secs(30)));
    let child = child_pid(&pid_file).await;
    // The next heartbeat (every second) says `running` with the key and is
    // answered `cancel: [key]`.
    until_dead(child).await;
    let beats = requests(&server, "POST", |p| p.ends_with("/heartbeat")).await;
    assert!(beats
        .iter()
        .any(|b| body(b) == json!({"state": "running", "job_key": KEY})));
    // Back to leasing, and nothing reported for a job the server cancelled.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(requests(&server, "POST", is_results).await.is_empty());
    let idle = requests(&server, "POST", |p| p.ends_with("/heartbeat")).await;
    assert!(
        idle.iter()
            .any(|b| body(b) == json!({"state": "idle", "job_key": null})),
        "idle again after the kill"
    );
    finish(drain, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_past_the_timeout_cancels_the_job_and_hands_it_back() {
    let scratch = tempfile::tempdir().unwrap();
    let pid_file = scratch.path().join("child.pid");
    let server = contract_server(vec![long_job(&pid_file)], false).await;
    let work = tempfile::tempdir().unwrap();
    let (drain, task) = start(config(&server, work.path(), Duration::from_secs(1)));
    let child = child_pid(&pid_file).await;
    drain.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the agent stops after the drain timeout")
        .unwrap()
        .unwrap();
    assert!(!running(child), "the job's group was stopped");
    let results = requests(&server, "POST", is_results).await;
    assert_eq!(results.len(), 1);
    assert_eq!(
        body(&results[0]),
        json!({"job_key": KEY, "worker_id": "w-1", "cancelled": true})
    );
    assert_eq!(
        requests(&server, "DELETE", |p| p == "/v1/workers/w-1")
            .await
            .len(),
        1
    );
    let beats = requests(&server, "POST", |p| p.ends_with("/heartbeat")).await;
    assert!(beats
        .iter()
        .any(|b| body(b) == json!({"state": "draining", "job_key": KEY})));
}

/// A server that answers w-1's lease with `status`/`code` and follows the
/// contract for w-2; returns it once the agent polls as w-2.
async fn w1_refused_then_w2(
    status: u16,
    code: &str,
) -> (MockServer, tempfile::TempDir, CancellationToken, AgentTask) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/v1/workers/w-1/(lease-job|heartbeat)$"))
        .respond_with(ResponseTemplate::new(status).set_body_json(json!({
            "error": {"code": code, "message": "about w-1"}
        })))
        .mount(&server)
        .await;
    for mock in [
        Mock::given(method("POST"))
            .and(path("/v1/workers"))
            .respond_with(Register(AtomicUsize::new(0))),
        Mock::given(method("POST"))
            .and(path_regex(r"^/v1/workers/w-2/lease-job$"))
            .respond_with(Lease(Mutex::new(VecDeque::new()))),
        Mock::given(method("POST"))
            .and(path_regex(r"^/v1/workers/w-2/heartbeat$"))
            .respond_with(Heartbeat {
                kill_running: false,
            }),
        Mock::given(method("DELETE"))
            .and(path_regex(r"^/v1/workers/w-\d+$"))
            .respond_with(ResponseTemplate::new(204)),
    ] {
        mock.mount(&server).await;
    }
    let work = tempfile::tempdir().unwrap();
    let (drain, task) = start(config(&server, work.path(), Duration::from_secs(5)));
    until(&server, "POST", |p| p == "/v1/workers/w-2/lease-job").await;
    assert_eq!(
        requests(&server, "POST", |p| p == "/v1/workers")
            .await
            .len(),
        2
    );
    (server, work, drain, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_worker_registers_again() {
    let (server, _work, drain, task) = w1_refused_then_w2(404, "worker_not_found").await;
    finish(drain, task).await;
    assert!(
        requests(&server, "DELETE", |p| p == "/v1/workers/w-1")
            .await
            .is_empty(),
        "an unknown id is not deregistered"
    );
    assert_eq!(
        requests(&server, "DELETE", |p| p == "/v1/workers/w-2")
            .await
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_answer_while_idle_hands_the_lost_job_back_and_registers_afresh() {
    // The answer of a lease that assigned a job was lost: the server says
    // busy although this worker runs nothing.
    let (server, _work, drain, task) = w1_refused_then_w2(409, "worker_busy").await;
    assert_eq!(
        requests(&server, "DELETE", |p| p == "/v1/workers/w-1")
            .await
            .len(),
        1,
        "deregistering re-queues the job the server holds for w-1"
    );
    finish(drain, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_scope_worker_stops_the_agent_with_a_clear_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/workers"))
        .respond_with(ResponseTemplate::new(403).set_body_json(json!({
            "error": {"code": "forbidden", "message": "token `ci` lacks scope worker"}
        })))
        .mount(&server)
        .await;
    let work = tempfile::tempdir().unwrap();
    let (_drain, task) = start(config(&server, work.path(), Duration::from_secs(5)));
    let err = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("403") && err.contains("RETRAIN_WORKER_TOKEN") && err.contains("scope"),
        "{err}"
    );
    assert!(!err.contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_the_server_no_longer_awaits_is_dropped_without_artifacts() {
    let script = r#"printf w > "$RETRAIN_ARTIFACTS_DIR/model.bin"; printf '{"candidate": "c"}' > "$RETRAIN_RESULT""#;
    let server = contract_server(vec![job(script, json!({}))], false).await;
    Mock::given(method("POST"))
        .and(path(format!("/v1/runs/{RUN}/results")))
        .respond_with(ResponseTemplate::new(409).set_body_json(json!({
            "error": {"code": "job_not_awaited", "message": "job run-7/train/1 was lost"}
        })))
        .with_priority(1)
        .mount(&server)
        .await;
    let work = tempfile::tempdir().unwrap();
    let (drain, task) = start(config(&server, work.path(), Duration::from_secs(5)));
    until(&server, "POST", is_results).await;
    // Back to leasing afterwards, as w-1.
    let leases = requests(&server, "POST", |p| p.ends_with("/lease-job"))
        .await
        .len();
    for _ in 0..50 {
        if requests(&server, "POST", |p| p.ends_with("/lease-job"))
            .await
            .len()
            > leases
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    finish(drain, task).await;
    assert_eq!(
        requests(&server, "POST", is_results).await.len(),
        1,
        "a 409 is not retried"
    );
    assert!(requests(&server, "PUT", |_| true).await.is_empty());
    assert!(
        requests(&server, "POST", |p| p.ends_with("/lease-job"))
            .await
            .len()
            > leases
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_beyond_what_the_server_keeps_is_skipped_with_a_marker() {
    // 200 KiB at once; the server keeps 64 KiB of a job's log.
    let script = r#"head -c 204800 /dev/zero | tr '\0' 'x'; echo; echo tail-line; sleep 2; printf '{"candidate": "c"}' > "$RETRAIN_RESULT""#;
    let server = contract_server(vec![job(script, json!({}))], false).await;
    let work = tempfile::tempdir().unwrap();
    let (drain, task) = start(config(&server, work.path(), Duration::from_secs(30)));
    until(&server, "POST", is_results).await;
    finish(drain, task).await;
    let chunks = requests(&server, "POST", |p| p.ends_with("/logs")).await;
    let log = logs(&chunks);
    assert!(
        log.starts_with("[retrain worker: "),
        "{}",
        &log[..80.min(log.len())]
    );
    assert!(log.contains("bytes of output skipped]"));
    assert!(log.ends_with("tail-line\n"));
    assert!(log.len() < 70 * 1024, "posted {} bytes", log.len());
    assert!(chunks
        .iter()
        .all(|c| body(c)["chunk"].as_str().unwrap().len() <= 16 * 1024 + 64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_the_server_refuses_is_reported_as_a_failure_quoting_it() {
    let script = r#"printf '{"candidate": "c", "metrics": {"loss": NaN}}' > "$RETRAIN_RESULT""#;
    let server = contract_server(vec![job(script, json!({}))], false).await;
    Mock::given(method("POST"))
        .and(path(format!("/v1/runs/{RUN}/results")))
        .and(wiremock::matchers::body_string_contains("\"candidate\""))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "error": {"code": "invalid_body", "message": "invalid JSON body: expected value"}
        })))
        .with_priority(1)
        .mount(&server)
        .await;
    let work = tempfile::tempdir().unwrap();
    let (drain, task) = start(config(&server, work.path(), Duration::from_secs(5)));
    for _ in 0..100 {
        if requests(&server, "POST", is_results).await.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    finish(drain, task).await;
    let results = requests(&server, "POST", is_results).await;
    assert_eq!(results.len(), 2, "the refused success, then the failure");
    let failure = body(&results[1]);
    assert_eq!(failure["failed"]["exit_status"], "exit status 0");
    let message = failure["failed"]["message"].as_str().unwrap();
    assert!(
        message.contains("refused its result") && message.contains("invalid_body"),
        "{message}"
    );
}
