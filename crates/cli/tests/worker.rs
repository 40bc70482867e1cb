//! `retrain worker` and `retrain workers`, the binary against a wiremock
//! server implementing the worker contract (the agent's job handling is
//! tested in crates/adapters/tests/it/worker_agent.rs).

use std::process::Stdio;
use std::time::Duration;

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::json;
use wiremock::matchers::{header, method, path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

const TOKEN: &str = "worker-t0ken-value";

fn retrain() -> Command {
    let mut cmd = Command::cargo_bin("retrain").unwrap();
    cmd.env_remove("RETRAIN_WORKER_TOKEN")
        .env_remove("RETRAIN_SERVER_TOKEN")
        .env_remove("RETRAIN_SERVER_URL")
        .env("RETRAIN_LOG", "info");
    cmd
}

#[test]
fn worker_without_a_token_exits_2_naming_the_variable() {
    let work = tempfile::tempdir().unwrap();
    retrain()
        .args(["worker", "--server", "http://127.0.0.1:9", "--work-dir"])
        .arg(work.path())
        .assert()
        .code(2)
        .stderr(predicate::str::contains("RETRAIN_WORKER_TOKEN"))
        .stderr(predicate::str::contains("scope `worker`"));
}

#[test]
fn worker_flags_are_validated_before_anything_is_sent() {
    let work = tempfile::tempdir().unwrap();
    for (flag, value, named) in [
        ("--resources", "gpu=2,disk=1T", "`disk` is not a resource"),
        ("--resources", "gpu_memory=lots", "`gpu_memory`"),
        ("--drain-timeout", "soon", "--drain-timeout"),
        ("--labels", "Not A Label", "--labels"),
    ] {
        retrain()
            .env("RETRAIN_WORKER_TOKEN", TOKEN)
            .args([
                "worker",
                "--server",
                "http://127.0.0.1:9",
                flag,
                value,
                "--work-dir",
            ])
            .arg(work.path())
            .assert()
            .code(2)
            .stderr(predicate::str::contains(named))
            .stderr(predicate::str::contains(TOKEN).not());
    }
}

#[test]
fn a_server_url_with_credentials_is_refused_without_echoing_them() {
    let work = tempfile::tempdir().unwrap();
    retrain()
        .env("RETRAIN_WORKER_TOKEN", TOKEN)
        .args([
            "worker",
            "--server",
            "https://admin:hunter2@retrain.example",
            "--work-dir",
        ])
        .arg(work.path())
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "--server must not carry user info",
        ))
        .stderr(predicate::str::contains("hunter2").not());
}

async fn listing_server() -> MockServer {
    let server = MockServer::start().await;
    let auth = format!("Bearer {TOKEN}");
    Mock::given(method("GET"))
        .and(path("/v1/workers"))
        .and(header("authorization", auth.as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"workers": [{
            "worker_id": "w-1", "name": "gpu-box", "hostname": "gpu-box.lab", "labels": ["seg"],
            "resources": {"cpus": 16, "memory_bytes": 274877906944u64, "gpus": 2,
                          "gpu_memory_bytes": 85899345920u64, "gpu_names": ["A100", "A100"], "tags": ["a100"]},
            "state": "idle", "job_key": null,
            "registered_at": "2026-01-01T00:00:00Z", "last_heartbeat_at": "2026-01-01T00:01:00Z"
        }]})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/workers/queue"))
        .and(header("authorization", auth.as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"jobs": [{
            "job_key": "run-2/train/1", "run_id": "run-2", "label": "seg", "state": "queued",
            "request": {"gpus": 4}, "worker_id": null,
            "enqueued_at": "2026-01-01T00:00:00Z", "waiting_secs": 42
        }]})))
        .mount(&server)
        .await;
    server
}

#[tokio::test]
async fn workers_lists_workers_and_the_queue_as_a_table_or_json() {
    let server = listing_server().await;
    let uri = server.uri();
    let table = tokio::task::spawn_blocking({
        let uri = uri.clone();
        move || {
            retrain()
                .env("RETRAIN_SERVER_TOKEN", TOKEN)
                .args(["workers", "--server", &uri])
                .assert()
                .success()
                .get_output()
                .stdout
                .clone()
        }
    })
    .await
    .unwrap();
    let table = String::from_utf8(table).unwrap();
    assert!(
        table.contains("gpu-box") && table.contains("16 cpu, 256G mem, 2x80G gpu, tags a100"),
        "{table}"
    );
    assert!(
        table.contains("run-2/train/1") && table.contains("4 gpu") && table.contains("42s"),
        "{table}"
    );

    // A worker token reads too; `--output json` gives both lists.
    let listed = tokio::task::spawn_blocking(move || {
        retrain()
            .env("RETRAIN_WORKER_TOKEN", TOKEN)
            .args(["workers", "--output", "json", "--server", &uri])
            .assert()
            .success()
            .get_output()
            .stdout
            .clone()
    })
    .await
    .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&listed).unwrap();
    assert_eq!(listed["workers"][0]["worker_id"], "w-1");
    assert_eq!(listed["jobs"][0]["job_key"], "run-2/train/1");
}

#[tokio::test]
async fn workers_with_a_refused_token_fails_naming_the_status() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(
                json!({"error": {"code": "unauthorized", "message": "unknown token"}}),
            ),
        )
        .mount(&server)
        .await;
    let uri = server.uri();
    tokio::task::spawn_blocking(move || {
        retrain()
            .env("RETRAIN_SERVER_TOKEN", TOKEN)
            .args(["workers", "--server", &uri])
            .assert()
            .code(1)
            .stderr(predicate::str::contains(
                "HTTP 401 unauthorized: unknown token",
            ))
            .stderr(predicate::str::contains(TOKEN).not());
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_deregisters_and_exits_0() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/workers"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "worker_id": "w-9", "heartbeat_interval_secs": 1, "worker_ttl_secs": 60
        })))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/v1/workers/w-9/lease-job$"))
        .respond_with(ResponseTemplate::new(204).set_delay(Duration::from_millis(500)))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/v1/workers/w-9/heartbeat$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"cancel": []})))
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/v1/workers/w-9"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    let work = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("retrain"))
        .env_remove("RETRAIN_SERVER_TOKEN")
        .env("RETRAIN_WORKER_TOKEN", TOKEN)
        .env("RETRAIN_LOG", "info")
        .args(["worker", "--server", &server.uri(), "--name", "cpu-box"])
        .args(["--resources", "gpu=0,tags=cpu-only", "--work-dir"])
        .arg(work.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Registered and polling.
    let mut registered = None;
    for _ in 0..100 {
        let requests = server.received_requests().await.unwrap_or_default();
        if let Some(r) = requests.iter().find(|r| r.url.path() == "/v1/workers") {
            if requests
                .iter()
                .any(|r| r.url.path().ends_with("/lease-job"))
            {
                registered = Some(serde_json::from_slice::<serde_json::Value>(&r.body).unwrap());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let registered = registered.expect("the worker registers and polls");
    assert_eq!(registered["name"], "cpu-box");
    assert_eq!(registered["resources"]["gpus"], 0);
    assert_eq!(registered["resources"]["tags"], json!(["cpu-only"]));
    assert!(registered["resources"]["cpus"].as_u64().unwrap() >= 1);
    assert!(registered["resources"]["memory_bytes"].as_u64().unwrap() > 0);

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut exited = None;
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(status) = exited else {
        child.kill().unwrap();
        panic!("the worker did not stop within 10s of SIGTERM");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("deregistered"), "{stderr}");
    assert!(!stderr.contains(TOKEN));
    // `expect(1)` on the DELETE is verified when the server drops.
}
