//! The worker pool with real processes (issue 13): the `retrain-server`
//! binary and `retrain worker` agents on 127.0.0.1, killed, stopped,
//! restarted and drained with real signals. The jobs are `sh` scripts
//! following the §6 protocol; each records in `ran.log` which worker ran
//! which attempt (see [`JOB_SH`]), which proves what ran where.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::processes::{
    free_port, ran, running, wait_gone, wait_started, ServerProcess, WorkerProcess,
};
use crate::support::{entry, Store, Workspace};

/// Records its start (`<label> <attempt> <worker> <pid>`), sleeps
/// `sleep_<label>_<worker>` seconds (a file, so a test makes one worker's
/// job slow), leaves an artifact and reports a candidate naming the worker.
const JOB_SH: &str = r#"
echo "$RETRAIN_LABEL $RETRAIN_ATTEMPT $TEST_WORKER $$" >> ran.log
echo "training $RETRAIN_LABEL attempt $RETRAIN_ATTEMPT on $TEST_WORKER"
sleep "$(cat "sleep_${RETRAIN_LABEL}_${TEST_WORKER}" 2>/dev/null || echo 0)"
printf 'weights of %s' "$RETRAIN_LABEL" > "$RETRAIN_ARTIFACTS_DIR/model.bin"
printf '{"candidate": "cand-%s-%s", "metrics": {"accuracy": 0.9}}' "$RETRAIN_LABEL" "$TEST_WORKER" > "$RETRAIN_RESULT"
"#;

/// Workers go stale 3 s after their last heartbeat (one a second). Labels:
/// `gpu` needs one GPU, `any` nothing, `big` more than any worker here
/// declares and waits 2 s at most.
fn workspace(store: &Store) -> Workspace {
    let port = free_port();
    let workspace = Workspace::with_config(store, |config| {
        let config = config
            .replace(
                "bind = \"127.0.0.1:0\"",
                &format!("bind = \"127.0.0.1:{port}\""),
            )
            .replacen(
                "[server]\n",
                "[server]\nworker_ttl = \"3s\"\nheartbeat_interval = \"1s\"\n",
                1,
            );
        let label = |name: &str, request: &str, queue_timeout: &str| {
            format!(
                r#"
[labels.{name}]
threshold = 10
counts = "none"
metadata = "file://metadata.json"
trainer = {{ worker = {{ {request}command = ["sh", "job.sh"], timeout = "2m", queue_timeout = "{queue_timeout}" }} }}
registry = {{ json = "registry.json", model = "{name}-model" }}
gate = {{ metrics = [{{ name = "accuracy", direction = "higher" }}] }}
"#
            )
        };
        format!(
            "{config}{}{}{}",
            label("gpu", "gpu = 1, ", "1m"),
            label("any", "", "1m"),
            label("big", "gpu = 2, gpu_memory = \"80G\", ", "2s"),
        )
    });
    std::fs::write(workspace.root().join("job.sh"), JOB_SH).unwrap();
    workspace
}

/// Make `label`'s job take `secs` seconds on `worker`.
fn slow(workspace: &Workspace, label: &str, worker: &str, secs: u32) {
    std::fs::write(
        workspace.root().join(format!("sleep_{label}_{worker}")),
        secs.to_string(),
    )
    .unwrap();
}

/// `POST /v1/runs` for `labels`; the run id of each.
async fn trigger(server: &ServerProcess, labels: &[&str]) -> Vec<String> {
    let started = server.app.trigger(labels).await;
    labels
        .iter()
        .map(|label| {
            entry(&started, label)["run_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no run for {label}: {started}"))
                .to_owned()
        })
        .collect()
}

/// The run once its stage is `done`.
async fn done(server: &ServerProcess, run_id: &str) -> Value {
    server
        .wait_run(run_id, "the run's end", |run| run["run"]["stage"] == "done")
        .await
}

fn job_states(run: &Value) -> Vec<&str> {
    run["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["state"].as_str().unwrap())
        .collect()
}

/// The job queue (`GET /v1/workers/queue`).
async fn queue(server: &ServerProcess) -> Vec<Value> {
    let queue: Value = server.app.read_json("/v1/workers/queue").await;
    queue["jobs"].as_array().cloned().unwrap_or_default()
}

/// Scenario 1: two workers with different resources. The `gpu` label runs
/// on the GPU worker only, `any` on either; both promote, with the log tail
/// and the artifact (hash in the manifest) from the worker that ran them.
async fn jobs_run_only_where_the_resources_fit(store: Store) {
    let workspace = workspace(&store);
    let server = ServerProcess::start(&workspace).await;
    let gpu_box = WorkerProcess::start(
        &server,
        &workspace,
        "gpu-box",
        &["--resources", "gpu=1,gpu_memory=24G"],
    );
    let cpu_box = WorkerProcess::start(&server, &workspace, "cpu-box", &["--resources", "gpu=0"]);
    let gpu_id = gpu_box.registered(&server, &[]).await;
    let cpu_id = cpu_box.registered(&server, &[]).await;
    // A second agent on gpu-box's work directory is refused.
    let mut twin = WorkerProcess::start(&server, &workspace, "gpu-box", &[]);
    assert_eq!(twin.wait_exit().await.code(), Some(2));
    let refusal = twin.output.text();
    let work_dir = WorkerProcess::work_dir(&workspace, "gpu-box");
    assert!(
        refusal.contains(&format!(
            "another retrain worker uses the work directory {}",
            work_dir.display()
        )),
        "{refusal}"
    );

    let runs = trigger(&server, &["gpu", "any"]).await;
    for (label, run_id) in ["gpu", "any"].iter().zip(&runs) {
        let run = done(&server, run_id).await;
        assert_eq!(run["report"]["status"], "promoted", "{label}: {run}");
        let job = &run["jobs"][0];
        let worker = job["worker_id"].as_str().unwrap();
        assert!([&gpu_id, &cpu_id].contains(&&worker.to_owned()), "{run}");
        let name = if worker == gpu_id {
            "gpu-box"
        } else {
            "cpu-box"
        };
        assert_eq!(
            run["report"]["candidate"]["id"],
            format!("cand-{label}-{name}"),
            "{run}"
        );
        assert!(
            job["log_tail"]
                .as_str()
                .unwrap_or_default()
                .contains(&format!("training {label} attempt 1 on {name}")),
            "{run}"
        );
        // The artifact is uploaded after the result: wait for it.
        let run = server
            .wait_run(run_id, "the artifact's upload", |run| {
                run["manifest"]["artifacts"].get(0).is_some()
            })
            .await;
        use sha2::Digest;
        let artifact = &run["manifest"]["artifacts"][0];
        assert_eq!(artifact["name"], "model.bin");
        let expected = format!("weights of {label}");
        assert_eq!(
            artifact["sha256"],
            hex::encode(sha2::Sha256::digest(expected.as_bytes()))
        );
    }
    let started = ran(workspace.root());
    assert_eq!(started.len(), 2, "{started:?}");
    let gpu_runs: Vec<_> = started.iter().filter(|r| r.label == "gpu").collect();
    assert_eq!(gpu_runs.len(), 1);
    assert_eq!(gpu_runs[0].worker, "gpu-box", "{started:?}");
}

/// Scenario 2: `kill -9` of the agent mid-job. After `worker_ttl` the job
/// is lost and attempt 2 runs on the other worker; the run promotes once.
/// The killed agent's job (its own process group) survives it; the agent
/// started again on the same work directory stops it before registering.
async fn a_killed_workers_job_is_retried_on_the_other(store: Store) {
    let workspace = workspace(&store);
    let server = ServerProcess::start(&workspace).await;
    slow(&workspace, "gpu", "first", 60);
    let first = WorkerProcess::start(&server, &workspace, "first", &["--resources", "gpu=1"]);
    let first_id = first.registered(&server, &[]).await;
    let run_id = trigger(&server, &["gpu"]).await.remove(0);
    let job = wait_started(workspace.root(), "gpu", 1).await.remove(0);
    assert_eq!((job.worker.as_str(), job.attempt), ("first", 1));
    let second = WorkerProcess::start(&server, &workspace, "second", &["--resources", "gpu=1"]);
    let second_id = second.registered(&server, &[]).await;

    first.signal("KILL");
    let run = done(&server, &run_id).await;
    assert_eq!(run["report"]["status"], "promoted", "{run}");
    assert_eq!(run["report"]["candidate"]["id"], "cand-gpu-second", "{run}");
    assert_eq!(
        run["report"]["lost_attempts"].as_array().unwrap().len(),
        1,
        "{run}"
    );
    assert_eq!(job_states(&run), ["lost", "finished"], "{run}");
    assert_eq!(run["jobs"][0]["worker_id"], first_id.as_str());
    assert_eq!(run["jobs"][1]["worker_id"], second_id.as_str());
    let started = ran(workspace.root());
    assert_eq!(
        started
            .iter()
            .map(|r| (r.attempt, r.worker.as_str()))
            .collect::<Vec<_>>(),
        [(1, "first"), (2, "second")]
    );
    let stale = server
        .workers()
        .await
        .into_iter()
        .find(|w| w["worker_id"] == first_id.as_str())
        .unwrap();
    assert_eq!(stale["state"], "stale");

    // The orphan: `kill -9` left the first job running...
    assert!(running(job.pid), "the first attempt's job is already gone");
    // ...until an agent starts again on that work directory.
    let restarted = WorkerProcess::start(&server, &workspace, "first", &["--resources", "gpu=1"]);
    wait_gone(job.pid, "the job the killed agent left").await;
    restarted
        .output
        .wait_for("stopped a job an earlier agent left running")
        .await;
    restarted.registered(&server, &[first_id]).await;
    // Promoted once: one version in the registry, the second worker's.
    let registry: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace.root().join("registry.json")).unwrap(),
    )
    .unwrap();
    let versions = registry["models"]["gpu-model"]["versions"]
        .as_array()
        .unwrap();
    assert_eq!(versions.len(), 1, "{registry}");
    assert_eq!(versions[0]["candidate"], "cand-gpu-second", "{registry}");
}

/// Scenario 3: an agent stopped (SIGSTOP) past `worker_ttl` loses its job
/// to the other worker; continued (SIGCONT), its heartbeat is answered
/// with the job's key and it kills the job's process group; the run's
/// result is the other worker's.
async fn a_worker_back_from_sigstop_kills_its_lost_job(store: Store) {
    let workspace = workspace(&store);
    let server = ServerProcess::start(&workspace).await;
    slow(&workspace, "gpu", "frozen", 60);
    let frozen = WorkerProcess::start(&server, &workspace, "frozen", &["--resources", "gpu=1"]);
    frozen.registered(&server, &[]).await;
    let run_id = trigger(&server, &["gpu"]).await.remove(0);
    let job = wait_started(workspace.root(), "gpu", 1).await.remove(0);
    frozen.signal("STOP");
    let other = WorkerProcess::start(&server, &workspace, "other", &["--resources", "gpu=1"]);
    let run = done(&server, &run_id).await;
    assert_eq!(run["report"]["status"], "promoted", "{run}");
    assert_eq!(run["report"]["candidate"]["id"], "cand-gpu-other", "{run}");
    assert_eq!(job_states(&run), ["lost", "finished"], "{run}");
    // Stopping the agent did not stop its job (another process group).
    assert!(running(job.pid));

    frozen.signal("CONT");
    wait_gone(job.pid, "the lost job of the continued worker").await;
    frozen
        .output
        .wait_for("the server asks for the running job to be killed")
        .await;
    // Its job is not the run's any more: nothing it did changed the result.
    let after = server.run(&run_id).await;
    assert_eq!(after["report"]["candidate"]["id"], "cand-gpu-other");
    assert_eq!(job_states(&after), ["lost", "finished"], "{after}");
    drop(other);
}

/// Scenario 4: the server restarts (SIGTERM, started again on the same
/// store and address, down longer than `worker_ttl`) while a worker runs
/// a job: the job goes on, its result reaches the restarted server, and the
/// run, resumed there at start-up without a trigger, promotes with it.
async fn a_job_outlives_a_server_restart(store: Store) {
    let workspace = workspace(&store);
    let mut server = ServerProcess::start(&workspace).await;
    slow(&workspace, "gpu", "steady", 8);
    let steady = WorkerProcess::start(&server, &workspace, "steady", &["--resources", "gpu=1"]);
    let steady_id = steady.registered(&server, &[]).await;
    let run_id = trigger(&server, &["gpu"]).await.remove(0);
    let job = wait_started(workspace.root(), "gpu", 1).await.remove(0);
    assert_eq!(server.terminate().await.code(), Some(0));
    // Down for longer than worker_ttl (3 s): the workers could not heartbeat.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(running(job.pid), "the job stopped with the server");
    let server = ServerProcess::start(&workspace).await;
    // The job's result reaches the restarted server (the agent retries it).
    server
        .wait_run(&run_id, "the job's result", |run| {
            run["jobs"][0]["state"] == "finished"
        })
        .await;
    // The restarted server resumes the run on its own and gates the result.
    let run = done(&server, &run_id).await;
    assert_eq!(run["report"]["status"], "promoted", "{run}");
    assert_eq!(run["report"]["candidate"]["id"], "cand-gpu-steady", "{run}");
    assert_eq!(job_states(&run), ["finished"], "{run}");
    assert_eq!(run["jobs"][0]["worker_id"], steady_id.as_str());
    assert_eq!(ran(workspace.root()).len(), 1, "the job ran twice");
}

/// Scenario 5: no fitting worker. `big` waits in the queue, visible there,
/// until its `queue_timeout` fails the run naming the unmet request; `gpu`
/// waits until a GPU worker registers and then runs there.
async fn a_label_waits_for_a_fitting_worker(store: Store) {
    let workspace = workspace(&store);
    let server = ServerProcess::start(&workspace).await;
    let cpu_box = WorkerProcess::start(&server, &workspace, "cpu-box", &["--resources", "gpu=0"]);
    cpu_box.registered(&server, &[]).await;
    let runs = trigger(&server, &["big", "gpu"]).await;
    let (big, gpu) = (&runs[0], &runs[1]);
    // Both wait in the queue (the cycle enqueues them after the trigger's answer).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let queued = queue(&server).await;
        let labels: BTreeSet<String> = queued
            .iter()
            .filter(|j| j["state"] == "queued")
            .map(|j| j["label"].as_str().unwrap().to_owned())
            .collect();
        if labels.len() == 2 {
            assert_eq!(labels, BTreeSet::from(["big".into(), "gpu".into()]));
            break;
        }
        assert!(Instant::now() < deadline, "not both queued: {queued:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let failed = done(&server, big).await;
    assert_eq!(failed["report"]["status"], "failed", "{failed}");
    let report = failed["report"].to_string();
    assert!(
        report.contains("no worker with") && report.contains("gpu"),
        "{report}"
    );
    assert!(
        queue(&server).await.iter().all(|j| j["label"] != "big"),
        "big is still queued"
    );
    // `gpu` still waits; a GPU worker arriving now takes it.
    assert_eq!(server.run(gpu).await["jobs"][0]["state"], "queued");
    let gpu_box = WorkerProcess::start(&server, &workspace, "gpu-box", &["--resources", "gpu=1"]);
    let run = done(&server, gpu).await;
    assert_eq!(run["report"]["status"], "promoted", "{run}");
    assert_eq!(run["report"]["candidate"]["id"], "cand-gpu-gpu-box");
    assert!(ran(workspace.root()).iter().all(|r| r.worker == "gpu-box"));
    drop(gpu_box);
}

/// Scenario 6: SIGTERM with a `--drain-timeout` shorter than the job: the
/// job is killed and handed back without using an attempt, the other
/// worker finishes it; the draining worker deregisters and exits 0.
async fn a_drained_job_is_finished_by_another_worker(store: Store) {
    let workspace = workspace(&store);
    let server = ServerProcess::start(&workspace).await;
    slow(&workspace, "gpu", "leaving", 60);
    let mut leaving = WorkerProcess::start(
        &server,
        &workspace,
        "leaving",
        &["--resources", "gpu=1", "--drain-timeout", "1s"],
    );
    let leaving_id = leaving.registered(&server, &[]).await;
    let run_id = trigger(&server, &["gpu"]).await.remove(0);
    let job = wait_started(workspace.root(), "gpu", 1).await.remove(0);
    let staying = WorkerProcess::start(&server, &workspace, "staying", &["--resources", "gpu=1"]);
    staying.registered(&server, &[]).await;

    leaving.signal("TERM");
    assert_eq!(leaving.wait_exit().await.code(), Some(0));
    assert!(!running(job.pid), "the drained job still runs");
    assert!(
        server
            .workers()
            .await
            .iter()
            .all(|w| w["worker_id"] != leaving_id.as_str()),
        "the drained worker is still registered"
    );
    let run = done(&server, &run_id).await;
    assert_eq!(run["report"]["status"], "promoted", "{run}");
    assert_eq!(run["report"]["candidate"]["id"], "cand-gpu-staying");
    assert_eq!(run["report"]["lost_attempts"], serde_json::json!([]));
    assert_eq!(job_states(&run), ["finished"], "{run}");
    let started = ran(workspace.root());
    assert_eq!(
        started
            .iter()
            .map(|r| (r.attempt, r.worker.as_str()))
            .collect::<Vec<_>>(),
        [(1, "leaving"), (1, "staying")]
    );
}

/// Scenario 7: a second signal during a drain stops at once: the job is
/// killed and reported cancelled (re-queued, no attempt used), the agent
/// deregisters and exits 130 (SIGINT) long before `--drain-timeout`.
async fn a_second_signal_cuts_the_drain_short(store: Store) {
    let workspace = workspace(&store);
    let server = ServerProcess::start(&workspace).await;
    slow(&workspace, "gpu", "impatient", 60);
    let mut impatient = WorkerProcess::start(
        &server,
        &workspace,
        "impatient",
        &["--resources", "gpu=1", "--drain-timeout", "10m"],
    );
    let impatient_id = impatient.registered(&server, &[]).await;
    let run_id = trigger(&server, &["gpu"]).await.remove(0);
    let job = wait_started(workspace.root(), "gpu", 1).await.remove(0);

    impatient.signal("TERM");
    impatient
        .output
        .wait_for("draining: letting the running job finish")
        .await;
    let forced = std::time::Instant::now();
    impatient.signal("INT");
    assert_eq!(impatient.wait_exit().await.code(), Some(130));
    assert!(
        forced.elapsed() < Duration::from_secs(15),
        "took {:?}",
        forced.elapsed()
    );
    assert!(!running(job.pid), "the job outlived the forced stop");
    let log = impatient.output.text();
    assert!(
        log.contains("forced to stop: the job was stopped and is handed back")
            && !log.contains("the cancellation could not be reported")
            && log.contains("deregistered"),
        "{log}"
    );
    let run = server.run(&run_id).await;
    assert_eq!(run["jobs"][0]["state"], "queued", "{run}");
    assert_eq!(run["jobs"][0]["attempt"], 1, "{run}");
    assert!(server
        .workers()
        .await
        .iter()
        .all(|w| w["worker_id"] != impatient_id.as_str()));
    // Handed back: another worker finishes it under the same key.
    let next = WorkerProcess::start(&server, &workspace, "next", &["--resources", "gpu=1"]);
    let run = done(&server, &run_id).await;
    assert_eq!(run["report"]["status"], "promoted", "{run}");
    assert_eq!(run["report"]["candidate"]["id"], "cand-gpu-next");
    assert_eq!(run["report"]["lost_attempts"], serde_json::json!([]));
    drop(next);
}

macro_rules! process_tests {
    (both: [$($both:ident),* $(,)?], sqlite: [$($sqlite:ident),* $(,)?]) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $both() {
                    super::$both(crate::support::Store::Sqlite).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $sqlite() {
                    super::$sqlite(crate::support::Store::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $both() {
                    let Some(store) = crate::support::Store::postgres().await else { return };
                    super::$both(store).await;
                }
            )*
        }
    };
}

process_tests!(
    both: [
        jobs_run_only_where_the_resources_fit,
        a_killed_workers_job_is_retried_on_the_other,
        a_job_outlives_a_server_restart,
        a_drained_job_is_finished_by_another_worker,
    ],
    sqlite: [
        a_worker_back_from_sigstop_kills_its_lost_job,
        a_label_waits_for_a_fitting_worker,
        a_second_signal_cuts_the_drain_short,
    ]
);
