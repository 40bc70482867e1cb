//! Remote workers over HTTP (the contract in `docs/server.md`, "Workers"):
//! a test plays `retrain worker` with a real HTTP client against a real
//! server whose label trains with `trainer = { worker = … }`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{spawn_in, Sse, SseClient, Store, TestApp, Workspace, ADMIN, READER, WORKER};

/// One `gpu` label trained by workers; workers go stale after 2 s.
fn workspace(store: &Store) -> Workspace {
    Workspace::with_config(store, |config| {
        let config = config.replacen(
            "[server]\n",
            "[server]\nworker_ttl = \"2s\"\nheartbeat_interval = \"1s\"\n",
            1,
        );
        format!(
            r#"{config}
[labels.gpu]
threshold = 10
counts = "none"
metadata = "file://metadata.json"
trainer = {{ worker = {{ gpu = 1, gpu_memory = "16G", command = ["python", "train.py"], env = {{ EPOCHS = "3" }}, timeout = "1h", queue_timeout = "1m" }} }}
registry = {{ json = "registry.json", model = "gpu-model" }}
gate = {{ metrics = [{{ name = "accuracy", direction = "higher" }}] }}
"#
        )
    })
}

fn resources(gpus: u32) -> Value {
    json!({
        "cpus": 8, "memory_bytes": 34_359_738_368u64, "gpus": gpus,
        "gpu_memory_bytes": if gpus > 0 { 25_769_803_776u64 } else { 0 },
        "gpu_names": if gpus > 0 { vec!["NVIDIA A10"] } else { vec![] }, "tags": []
    })
}

async fn register(app: &TestApp, name: &str, gpus: u32) -> String {
    let response = app
        .post("/v1/workers", WORKER)
        .json(&json!({"name": name, "hostname": "host", "resources": resources(gpus), "version": "test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["heartbeat_interval_secs"], 1);
    assert_eq!(body["worker_ttl_secs"], 2);
    body["worker_id"].as_str().unwrap().to_owned()
}

async fn heartbeat(app: &TestApp, worker: &str, job_key: Option<&str>) -> reqwest::Response {
    let state = if job_key.is_some() { "running" } else { "idle" };
    app.post(&format!("/v1/workers/{worker}/heartbeat"), WORKER)
        .json(&json!({"state": state, "job_key": job_key}))
        .send()
        .await
        .unwrap()
}

/// Keep `worker` live (a heartbeat every 300 ms) until the task is aborted.
fn keep_alive(app: &TestApp, worker: &str) -> tokio::task::JoinHandle<()> {
    let (client, url) = (
        app.client.clone(),
        app.url(&format!("/v1/workers/{worker}/heartbeat")),
    );
    tokio::spawn(async move {
        loop {
            let _ = client
                .post(&url)
                .bearer_auth(WORKER)
                .json(&json!({"state": "idle"}))
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

async fn lease(app: &TestApp, worker: &str, wait_secs: u32) -> reqwest::Response {
    app.post(&format!("/v1/workers/{worker}/lease-job"), WORKER)
        .json(&json!({ "wait_secs": wait_secs }))
        .send()
        .await
        .unwrap()
}

/// Lease until a job comes (bounded); the job.
async fn lease_job(app: &TestApp, worker: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = lease(app, worker, 2).await;
        if response.status() == 200 {
            return response.json().await.unwrap();
        }
        assert_eq!(response.status(), 204);
        assert!(Instant::now() < deadline, "no job for {worker}");
    }
}

async fn post_result(app: &TestApp, run: &str, body: &Value) -> reqwest::Response {
    app.post(&format!("/v1/runs/{run}/results"), WORKER)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn success(job: &Value, worker: &str, accuracy: f64) -> Value {
    json!({
        "job_key": job["job_key"], "worker_id": worker,
        "candidate": "cand-gpu", "metrics": {"accuracy": accuracy}
    })
}

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

async fn run(app: &TestApp, run: &str) -> Value {
    app.read_json(&format!("/v1/runs/{run}")).await
}

async fn trigger_gpu(app: &TestApp) -> String {
    let started = app.trigger(&["gpu"]).await;
    crate::support::entry(&started, "gpu")["run_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Register → a long poll answered when the cycle enqueues → logs →
/// results (refusals first: wrong scope, wrong worker, invalid, unknown
/// key) → the run promotes, its log tail visible; the result is idempotent.
async fn a_worker_trains_a_label_over_http(store: Store) {
    let workspace = workspace(&store);
    let app = spawn_in(&workspace).await;
    // Wrong scope: a reader cannot register or lease.
    let response = app
        .post("/v1/workers", READER)
        .json(&json!({"name": "x", "hostname": "h", "resources": resources(0), "version": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(
        app.get("/v1/workers", READER)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["workers"],
        json!([])
    );
    let cpu = register(&app, "cpu-box", 0).await;
    let gpu = register(&app, "gpu-box", 1).await;
    let alive = [keep_alive(&app, &cpu), keep_alive(&app, &gpu)];
    assert_eq!(
        app.post(&format!("/v1/workers/{gpu}/lease-job"), READER)
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    // Nothing queued: the long poll ends empty after wait_secs.
    let asked = Instant::now();
    assert_eq!(lease(&app, &gpu, 1).await.status(), 204);
    assert!(asked.elapsed() >= Duration::from_millis(900));

    let polling = {
        let (client, url) = (
            app.client.clone(),
            app.url(&format!("/v1/workers/{gpu}/lease-job")),
        );
        tokio::spawn(async move {
            let response = client
                .post(url)
                .bearer_auth(WORKER)
                .json(&json!({"wait_secs": 20}))
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                Instant::now(),
                response.json::<Value>().await.ok(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let triggered = Instant::now();
    let run_id = trigger_gpu(&app).await;
    let (status, answered, job) = polling.await.unwrap();
    assert_eq!(status, 200);
    let job = job.unwrap();
    assert!(
        answered.duration_since(triggered) < Duration::from_secs(3),
        "the long poll took {:?}",
        answered.duration_since(triggered)
    );
    let key = format!("{run_id}/train/1");
    assert_eq!(job["job_key"], key.as_str());
    assert_eq!(job["run_id"], run_id.as_str());
    assert_eq!(job["label"], "gpu");
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["dataset"], json!({"name": "tickets", "version": "v1"}));
    assert_eq!(job["command"], json!(["python", "train.py"]));
    assert_eq!(job["env"], json!({"EPOCHS": "3"}));
    assert_eq!(job["timeout_secs"], 3600);
    assert_eq!(job["results_url"], format!("/v1/runs/{run_id}/results"));
    assert_eq!(job["logs_url"], format!("/v1/runs/{run_id}/logs"));
    assert_eq!(job["artifacts_url"], format!("/v1/runs/{run_id}/artifacts"));
    // One job at a time; the CPU worker never gets the GPU job.
    assert_eq!(
        error_code(lease(&app, &gpu, 1).await).await,
        (409, "worker_busy".into())
    );
    assert_eq!(lease(&app, &cpu, 1).await.status(), 204);
    let queue: Value = app.read_json("/v1/workers/queue").await;
    assert_eq!(queue["jobs"][0]["state"], "assigned");
    assert_eq!(queue["jobs"][0]["worker_id"], gpu.as_str());
    assert_eq!(queue["jobs"][0]["request"]["gpus"], 1);
    let shown: Value = app.read_json(&format!("/v1/workers/{gpu}")).await;
    assert_eq!(shown["job_key"], key.as_str());
    assert_eq!(shown["resources"]["gpus"], 1);

    // Logs: only from the holder.
    let log = |worker: &str, chunk: &str| {
        app.post(&format!("/v1/runs/{run_id}/logs"), WORKER)
            .json(&json!({"job_key": key, "worker_id": worker, "chunk": chunk}))
            .send()
    };
    assert_eq!(
        log(&gpu, "epoch 1/3 loss=0.4\n").await.unwrap().status(),
        204
    );
    assert_eq!(
        error_code(log(&cpu, "forged\n").await.unwrap()).await,
        (409, "job_not_assigned".into())
    );
    let cancel: Value = heartbeat(&app, &gpu, Some(&key))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cancel, json!({"cancel": []}));

    // Refusals, each storing nothing.
    let invalid =
        json!({"job_key": key, "worker_id": gpu, "candidate": "", "metrics": {"accuracy": 0.9}});
    let response = post_result(&app, &run_id, &invalid).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_result");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("candidate"),
        "{body}"
    );
    let bad_metric = json!({"job_key": key, "worker_id": gpu, "candidate": "c", "metrics": {"accuracy": "high"}});
    assert_eq!(
        error_code(post_result(&app, &run_id, &bad_metric).await)
            .await
            .0,
        422
    );
    assert_eq!(run(&app, &run_id).await["jobs"][0]["state"], "assigned");
    assert_eq!(
        error_code(
            post_result(
                &app,
                &run_id,
                &success(&json!({"job_key": format!("{run_id}/train/9")}), &gpu, 0.9)
            )
            .await
        )
        .await,
        (409, "job_not_awaited".into())
    );
    assert_eq!(
        error_code(post_result(&app, &run_id, &success(&job, &cpu, 0.9)).await).await,
        (409, "job_not_awaited".into())
    );
    let anonymous = json!({"job_key": key, "candidate": "c", "metrics": {"accuracy": 0.9}});
    assert_eq!(
        error_code(post_result(&app, &run_id, &anonymous).await).await,
        (409, "job_not_awaited".into())
    );
    assert_eq!(
        error_code(post_result(&app, "no-such-run", &success(&job, &gpu, 0.9)).await).await,
        (404, "run_not_found".into())
    );
    let wrong_scope = app
        .post(&format!("/v1/runs/{run_id}/results"), READER)
        .json(&success(&job, &gpu, 0.9))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_scope.status(), 403);

    // The result: accepted, idempotent, a different one refused.
    let response = post_result(&app, &run_id, &success(&job, &gpu, 0.9)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"accepted": true})
    );
    assert_eq!(
        post_result(&app, &run_id, &success(&job, &gpu, 0.9))
            .await
            .status(),
        200
    );
    assert_eq!(
        error_code(post_result(&app, &run_id, &success(&job, &gpu, 0.5)).await).await,
        (409, "job_not_awaited".into())
    );
    let done = app.wait_stage(&run_id, &["done"]).await;
    assert_eq!(done["report"]["status"], "promoted", "{done}");
    assert_eq!(done["report"]["candidate"]["id"], "cand-gpu");
    assert_eq!(done["jobs"][0]["state"], "finished");
    assert_eq!(done["jobs"][0]["worker_id"], gpu.as_str());
    assert_eq!(done["jobs"][0]["log_tail"], "epoch 1/3 loss=0.4\n");

    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "retrain_workers{state=\"idle\"} 2",
        "retrain_worker_events_total{event=\"job.assigned\"} 1",
        "retrain_worker_events_total{event=\"job.finished\"} 1",
        "retrain_worker_job_queue_wait_seconds_count 1",
        "retrain_worker_jobs{state=\"queued\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    for task in alive {
        task.abort();
    }
    app.shutdown().await.unwrap();
}

/// A worker that stops heartbeating goes stale: its job is lost, the
/// engine enqueues attempt 2, another worker finishes it; the stale worker
/// coming back is told to kill its job and its late result is refused.
/// Cleanup removes stale workers only.
async fn a_stale_workers_job_is_retried_on_another(store: Store) {
    let workspace = workspace(&store);
    let app = spawn_in(&workspace).await;
    let dies = register(&app, "dies", 1).await;
    let run_id = trigger_gpu(&app).await;
    let first = lease_job(&app, &dies).await;
    assert_eq!(first["attempt"], 1);
    let lives = register(&app, "lives", 1).await;
    let alive = keep_alive(&app, &lives);
    // `dies` sends no heartbeat: after worker_ttl (2 s) the sweeper marks
    // it stale and its job lost; the engine enqueues attempt 2.
    let second = lease_job(&app, &lives).await;
    assert_eq!(second["job_key"], format!("{run_id}/train/2"));
    assert_eq!(second["attempt"], 2);
    let stale: Value = app.read_json(&format!("/v1/workers/{dies}")).await;
    assert_eq!(stale["state"], "stale");
    // It comes back: live again, told to kill the job it still runs.
    let key = first["job_key"].as_str().unwrap();
    let answer: Value = heartbeat(&app, &dies, Some(key))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer, json!({"cancel": [key]}));
    assert_eq!(
        error_code(post_result(&app, &run_id, &success(&first, &dies, 0.99)).await).await,
        (409, "job_not_awaited".into())
    );
    assert_eq!(
        post_result(&app, &run_id, &success(&second, &lives, 0.9))
            .await
            .status(),
        200
    );
    let done = app.wait_stage(&run_id, &["done"]).await;
    assert_eq!(done["report"]["status"], "promoted", "{done}");
    assert_eq!(done["report"]["candidate"]["id"], "cand-gpu");
    assert_eq!(
        done["report"]["lost_attempts"].as_array().unwrap().len(),
        1,
        "{done}"
    );
    let states: Vec<&str> = done["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["lost", "finished"]);

    // Cleanup: `dies` is live again; `ghost` never heartbeats and goes.
    let alive_dies = keep_alive(&app, &dies);
    let ghost = register(&app, "ghost", 0).await;
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let cleanup = |token: &'static str| app.post("/v1/admin/workers/cleanup", token).send();
    assert_eq!(cleanup(READER).await.unwrap().status(), 403);
    let removed: Value = cleanup(ADMIN).await.unwrap().json().await.unwrap();
    assert_eq!(removed, json!({"removed": [ghost]}));
    assert_eq!(
        error_code(heartbeat(&app, &ghost, None).await).await,
        (404, "worker_not_found".into())
    );
    let workers: Value = app.read_json("/v1/workers").await;
    assert_eq!(workers["workers"].as_array().unwrap().len(), 2, "{workers}");
    alive.abort();
    alive_dies.abort();
    app.shutdown().await.unwrap();
}

/// A draining worker gives its job back (same key, no attempt used) and
/// deregisters; another worker finishes the job.
async fn a_drained_job_goes_back_to_the_queue(store: Store) {
    let workspace = workspace(&store);
    let app = spawn_in(&workspace).await;
    let leaving = register(&app, "leaving", 1).await;
    let alive = keep_alive(&app, &leaving);
    let run_id = trigger_gpu(&app).await;
    let job = lease_job(&app, &leaving).await;
    let cancelled = json!({"job_key": job["job_key"], "worker_id": leaving, "cancelled": true});
    assert_eq!(post_result(&app, &run_id, &cancelled).await.status(), 200);
    alive.abort();
    let response = app
        .client
        .delete(app.url(&format!("/v1/workers/{leaving}")))
        .bearer_auth(WORKER)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let again = app
        .client
        .delete(app.url(&format!("/v1/workers/{leaving}")))
        .bearer_auth(WORKER)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(again).await, (404, "worker_not_found".into()));
    // A worker whose lease answer was lost: it holds the job but says it
    // runs nothing; two heartbeat intervals later the job is released.
    let unlucky = register(&app, "unlucky", 1).await;
    let unclaimed = lease_job(&app, &unlucky).await;
    assert_eq!(unclaimed["job_key"], job["job_key"]);
    let answer: Value = heartbeat(&app, &unlucky, None).await.json().await.unwrap();
    assert_eq!(answer, json!({"cancel": []}));
    assert_eq!(
        error_code(lease(&app, &unlucky, 1).await).await,
        (409, "worker_busy".into())
    );
    // Its idle heartbeats go on (it must not go stale meanwhile).
    let idle = keep_alive(&app, &unlucky);
    tokio::time::sleep(Duration::from_millis(2600)).await;
    idle.abort();
    let released: Value = app.read_json(&format!("/v1/workers/{unlucky}")).await;
    assert_eq!(released["job_key"], Value::Null);
    app.client
        .delete(app.url(&format!("/v1/workers/{unlucky}")))
        .bearer_auth(WORKER)
        .send()
        .await
        .unwrap();
    let next = register(&app, "next", 2).await;
    let alive = keep_alive(&app, &next);
    let resumed = lease_job(&app, &next).await;
    assert_eq!(resumed["job_key"], job["job_key"]);
    assert_eq!(resumed["attempt"], 1);
    assert_eq!(
        post_result(&app, &run_id, &success(&resumed, &next, 0.9))
            .await
            .status(),
        200
    );
    let done = app.wait_stage(&run_id, &["done"]).await;
    assert_eq!(done["report"]["status"], "promoted", "{done}");
    assert_eq!(done["report"]["lost_attempts"], json!([]));
    assert_eq!(done["jobs"].as_array().unwrap().len(), 1);
    alive.abort();
    app.shutdown().await.unwrap();
}

/// Two replicas on one store: a job enqueued by one is leased through the
/// other's long poll (its periodic re-check), and the result posted to the
/// second completes the run driven by the first.
async fn a_job_enqueued_by_one_replica_is_leased_from_another(store: Store) {
    let workspace = workspace(&store);
    let driver = spawn_in(&workspace).await;
    let other = spawn_in(&workspace).await;
    let worker = register(&other, "far", 1).await;
    let alive = keep_alive(&other, &worker);
    let polling = {
        let (client, url) = (
            other.client.clone(),
            other.url(&format!("/v1/workers/{worker}/lease-job")),
        );
        tokio::spawn(async move {
            let response = client
                .post(url)
                .bearer_auth(WORKER)
                .json(&json!({"wait_secs": 20}))
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                Instant::now(),
                response.json::<Value>().await.ok(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let triggered = Instant::now();
    let run_id = trigger_gpu(&driver).await;
    let (status, answered, job) = polling.await.unwrap();
    assert_eq!(status, 200);
    assert!(
        answered.duration_since(triggered) < Duration::from_secs(3),
        "{:?}",
        answered.duration_since(triggered)
    );
    let job = job.unwrap();
    assert_eq!(job["run_id"], run_id.as_str());
    assert_eq!(
        post_result(&other, &run_id, &success(&job, &worker, 0.9))
            .await
            .status(),
        200
    );
    let done = driver.wait_stage(&run_id, &["done"]).await;
    assert_eq!(done["report"]["status"], "promoted", "{done}");
    alive.abort();
    other.shutdown().await.unwrap();
    driver.shutdown().await.unwrap();
}

/// The kinds of `events`, keeping only worker and job events.
fn worker_kinds(events: &[Sse]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e.event.as_str())
        .filter(|kind| kind.starts_with("worker.") || kind.starts_with("job."))
        .collect()
}

fn index_of(events: &[Sse], kind: &str, key: &str, value: &str) -> usize {
    events
        .iter()
        .position(|e| e.event == kind && e.data[key] == value)
        .unwrap_or_else(|| panic!("no {kind} with {key} = {value} in {events:?}"))
}

/// Worker and job events on `GET /v1/events`, between the run's own events,
/// with ids from one counter: a worker goes stale mid-job, its job is lost
/// and retried on another worker. Resuming with `Last-Event-ID` gives
/// exactly the rest; `?types=` and `?label=` filter them.
async fn worker_and_job_events_are_on_the_stream(store: Store) {
    let workspace = workspace(&store);
    let app = spawn_in(&workspace).await;
    let mut all = SseClient::open(&app, "", None).await;
    let mut stale_only = SseClient::open(&app, "?types=worker.stale,job.lost", None).await;
    let mut gpu_only = SseClient::open(&app, "?label=gpu", None).await;
    let lives = register(&app, "lives", 1).await;
    let alive = keep_alive(&app, &lives);
    let dies = register(&app, "dies", 1).await;
    let run_id = trigger_gpu(&app).await;
    let first = lease_job(&app, &dies).await;
    // `dies` sends no heartbeat: stale after worker_ttl, its job lost, the
    // engine enqueues attempt 2.
    let second = lease_job(&app, &lives).await;
    assert_eq!(second["attempt"], 2);
    assert_eq!(
        post_result(&app, &run_id, &success(&second, &lives, 0.9))
            .await
            .status(),
        200
    );
    let events = all.until(&run_id, "run.finished").await;
    let ids: Vec<u64> = events.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(
        worker_kinds(&events),
        [
            "worker.registered",
            "worker.registered",
            "job.queued",
            "job.assigned",
            "worker.stale",
            "job.lost",
            "job.queued",
            "job.assigned",
            "job.finished",
        ],
        "{events:?}"
    );
    let (first_key, second_key) = (
        first["job_key"].as_str().unwrap(),
        second["job_key"].as_str().unwrap(),
    );
    // Interleaved with the run's events in the order things happened.
    let at = |kind: &str, key: &str, value: &str| index_of(&events, kind, key, value);
    assert!(at("worker.registered", "worker_id", &dies) < at("run.started", "run_id", &run_id));
    assert!(at("job.queued", "job_key", first_key) < at("training.lost", "run_id", &run_id));
    assert!(at("job.lost", "job_key", first_key) < at("training.lost", "run_id", &run_id));
    assert!(at("job.finished", "job_key", second_key) < at("training.finished", "run_id", &run_id));
    let lost = &events[at("job.lost", "job_key", first_key)];
    assert_eq!(lost.data["type"], "job.lost");
    assert_eq!(lost.data["worker_id"], dies.as_str());
    assert_eq!(lost.data["run_id"], run_id.as_str());
    assert_eq!(lost.data["label"], "gpu");
    assert_eq!(lost.data["detail"]["attempt"], 1);
    let finished = &events[at("job.finished", "job_key", second_key)];
    assert_eq!(finished.data["worker_id"], lives.as_str());
    assert_eq!(finished.data["detail"]["candidate"], "cand-gpu");
    let registered = &events[at("worker.registered", "worker_id", &lives)];
    assert_eq!(registered.data["detail"]["name"], "lives");
    assert_eq!(registered.data["label"], Value::Null);
    for event in &events {
        assert!(!event.data.to_string().contains("EPOCHS"), "{event:?}");
        assert!(!event.data.to_string().contains(WORKER), "{event:?}");
    }

    // Resuming in the middle gives exactly the rest.
    let middle = at("job.lost", "job_key", first_key);
    let mut resumed = SseClient::open(&app, "", Some(events[middle].id)).await;
    assert_eq!(
        resumed.until(&run_id, "run.finished").await,
        events[middle + 1..].to_vec()
    );

    // `?types=`: the stale worker and its lost job, nothing else.
    let filtered = [
        stale_only.next().await.unwrap(),
        stale_only.next().await.unwrap(),
    ];
    assert_eq!(filtered[0], events[at("worker.stale", "worker_id", &dies)]);
    assert_eq!(filtered[1], events[middle]);
    assert!(
        tokio::time::timeout(Duration::from_millis(600), stale_only.next())
            .await
            .is_err(),
        "only worker.stale and job.lost pass"
    );
    // `?label=`: the label's run and job events, no worker events.
    let expected: Vec<Sse> = events
        .iter()
        .filter(|e| e.data["label"] == "gpu")
        .cloned()
        .collect();
    assert!(expected.iter().any(|e| e.event == "job.finished"));
    assert_eq!(gpu_only.until(&run_id, "run.finished").await, expected);

    // Deregistering is one more event.
    alive.abort();
    let response = app
        .client
        .delete(app.url(&format!("/v1/workers/{lives}")))
        .bearer_auth(WORKER)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let removed = all.next().await.unwrap();
    assert_eq!(removed.event, "worker.removed");
    assert_eq!(removed.data["worker_id"], lives.as_str());
    assert_eq!(removed.data["detail"]["reason"], "deregistered");
    assert!(removed.id > ids[ids.len() - 1]);
    app.shutdown().await.unwrap();
}

/// A worker registering with one replica shows on another replica's
/// stream (Postgres: LISTEN/NOTIFY; SQLite: its poll).
async fn a_replicas_worker_events_reach_the_other_stream(store: Store) {
    let workspace = workspace(&store);
    let (one, two) = tokio::join!(spawn_in(&workspace), spawn_in(&workspace));
    let mut stream = SseClient::open(&one, "?types=worker.registered,worker.removed", None).await;
    let far = register(&two, "far", 0).await;
    let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the other replica's event within 10 s")
        .unwrap();
    assert_eq!(event.event, "worker.registered");
    assert_eq!(event.data["worker_id"], far.as_str());
    assert_eq!(event.data["detail"]["name"], "far");
    let (stopped_one, stopped_two) = tokio::join!(one.shutdown(), two.shutdown());
    stopped_one.unwrap();
    stopped_two.unwrap();
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::Store::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(store) = crate::support::Store::postgres().await else { return };
                    super::$name(store).await;
                }
            )*
        }
    };
}

on_both_stores!(
    a_worker_trains_a_label_over_http,
    a_stale_workers_job_is_retried_on_another,
    a_drained_job_goes_back_to_the_queue,
    a_job_enqueued_by_one_replica_is_leased_from_another,
    worker_and_job_events_are_on_the_stream,
    a_replicas_worker_events_reach_the_other_stream,
);

/// The real agent (`retrain worker`'s library) against the real server: a
/// label trained by `trainer = { worker = … }` is leased by the agent, run
/// as a local command job (its output streamed to the run's log tail), its
/// result reported, and the candidate promoted; then the agent drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_agent_trains_a_worker_label_to_promotion() {
    use retrain_adapters::http::HttpPolicy;
    use retrain_adapters::worker_agent::{AgentConfig, Resources, WorkerAgent};

    let workspace = workspace(&Store::Sqlite);
    let script = workspace.root().join("agent_train.sh");
    std::fs::write(
        &script,
        r#"echo "epoch 1 of $EPOCHS done for $RETRAIN_LABEL"
printf 'weights' > "$RETRAIN_ARTIFACTS_DIR/model.bin"
printf '{"candidate": "cand-agent", "metrics": {"accuracy": 0.9}}' > "$RETRAIN_RESULT"
"#,
    )
    .unwrap();
    let config = std::fs::read_to_string(workspace.config())
        .unwrap()
        .replace(
            r#"command = ["python", "train.py"]"#,
            &format!(r#"command = ["sh", "{}"]"#, script.display()),
        );
    std::fs::write(workspace.config(), config).unwrap();
    let app = spawn_in(&workspace).await;

    let work_dir = tempfile::tempdir().unwrap();
    let agent = WorkerAgent::new(AgentConfig {
        server: app.url(""),
        token: secrecy::SecretString::from(WORKER),
        name: "lab-gpu".into(),
        hostname: "lab-gpu.local".into(),
        labels: Vec::new(),
        resources: Resources {
            cpus: 8,
            memory_bytes: 32 << 30,
            gpus: 1,
            gpu_memory_bytes: 24 << 30,
            gpu_names: vec!["NVIDIA L4".into()],
            tags: Vec::new(),
        },
        work_dir: work_dir.path().to_path_buf(),
        drain_timeout: Duration::from_secs(10),
        lease_wait_secs: 1,
        http: HttpPolicy::fast_for_tests(),
        hidden_env: Vec::new(),
    })
    .unwrap();
    let drain = retrain_core::CancellationToken::new();
    let agent = tokio::spawn(agent.run(drain.clone()));

    let triggered = app.trigger(&["gpu"]).await;
    let run_id = triggered["labels"][0]["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = app.wait_stage(&run_id, &["done"]).await;
    assert_eq!(done["report"]["status"], "promoted", "{done}");
    assert_eq!(done["report"]["candidate"]["id"], "cand-agent", "{done}");
    let shown = run(&app, &run_id).await;
    let tail = shown["jobs"][0]["log_tail"].as_str().unwrap_or_default();
    assert!(tail.contains("epoch 1 of 3 done for gpu"), "{shown}");
    // The artifact the job left arrives after its result, hash in the manifest.
    let deadline = Instant::now() + Duration::from_secs(20);
    let artifact = loop {
        let shown = run(&app, &run_id).await;
        if let Some(artifact) = shown["manifest"]["artifacts"].get(0) {
            break artifact.clone();
        }
        assert!(Instant::now() < deadline, "no artifact arrived: {shown}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    use sha2::Digest;
    assert_eq!(artifact["name"], "model.bin");
    assert_eq!(
        artifact["sha256"],
        hex::encode(sha2::Sha256::digest(b"weights"))
    );
    let bytes = app
        .get(&format!("/v1/runs/{run_id}/artifacts/model.bin"), READER)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&bytes[..], b"weights");

    // SIGTERM's path: drain, deregister, end cleanly.
    drain.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .expect("the agent drains in time")
        .unwrap()
        .unwrap();
    let workers: Value = app.read_json("/v1/workers").await;
    assert_eq!(workers["workers"], json!([]), "{workers}");
    app.shutdown().await.unwrap();
}
