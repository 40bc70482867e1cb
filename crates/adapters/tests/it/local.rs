//! Local adapters: command trainer and prepare job (real `sh` processes), file
//! metadata store, JSON registry, log notifier.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use retrain_adapters::command::{CommandSpace, CommandSpec, CommandTrainer};
use retrain_adapters::file_metadata::FileMetadataStore;
use retrain_adapters::json_registry::JsonRegistry;
use retrain_adapters::log_notifier::LogNotifier;
use retrain_adapters::scrub::Scrubber;
use retrain_core::domain::{
    Candidate, JobKey, Label, Lease, Metrics, RunId, SpaceStage, TrainingHandle, TrainingOutcome,
    VersionTag,
};
use retrain_core::ports::{
    MetadataRead, MetadataStore, ModelRegistry, Notifier, PortError, RegistryRollback,
    SpaceController, Trainer, TrainingRequest,
};
use retrain_core::report::LabelReport;

fn sh(script: &str) -> CommandSpec {
    CommandSpec::new(vec!["sh".into(), "-c".into(), script.into()]).unwrap()
}

fn request(run_id: &str, attempt: u32, lease: Option<Lease>) -> TrainingRequest {
    TrainingRequest {
        label: Label::new("segmentation").unwrap(),
        run_id: RunId(run_id.into()),
        attempt,
        job_key: JobKey(format!("{run_id}/train/{attempt}")),
        dataset_name: "owner/wms".into(),
        dataset_version: VersionTag::new("v20251030_115250"),
        lease,
        first_start: false,
    }
}

fn lease(ip: &str) -> Lease {
    let now = Utc::now();
    Lease {
        id: "lease-1".into(),
        label: Label::new("segmentation").unwrap(),
        run_id: RunId("run-lease".into()),
        provider: "ec2".into(),
        resources: vec!["i-0abc".into()],
        region: Some("eu-west-1".into()),
        acquired_at: now,
        max_until: now + chrono::Duration::hours(1),
        attributes: BTreeMap::from([("public_ip".to_owned(), ip.to_owned())]),
        released_at: None,
    }
}

/// Whether `pid` is a running (non-zombie) process.
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let rest = &stat[stat.rfind(')').unwrap() + 1..];
            !matches!(rest.split_whitespace().next(), Some("Z" | "X"))
        }
        Err(_) => false,
    }
}

async fn read_pid(path: &Path) -> u32 {
    for _ in 0..200 {
        if let Ok(raw) = std::fs::read_to_string(path) {
            if let Some(line) = raw.lines().next().filter(|l| !l.trim().is_empty()) {
                return line.trim().parse().unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} was never written", path.display());
}

fn handle_pid(handle: &TrainingHandle) -> u32 {
    handle.data["pid"].as_u64().unwrap() as u32
}

// ---------------------------------------------------------------- trainer

#[tokio::test]
async fn command_trainer_passes_the_protocol_env_and_reads_the_result() {
    let state = tempfile::tempdir().unwrap();
    let workdir = tempfile::tempdir().unwrap();
    let mut spec = sh(r#"
        echo "training $RETRAIN_DATASET_VERSION"
        id="$RETRAIN_LABEL|$RETRAIN_RUN_ID|$RETRAIN_ATTEMPT|$RETRAIN_JOB_KEY|$RETRAIN_DATASET_NAME|$RETRAIN_DATASET_VERSION|$RETRAIN_HOST|$MLFLOW_TRACKING_URI|$(pwd)"
        printf '{"candidate":"%s","metrics":{"dice":0.81,"iou":%s},"notes":"ignored"}' "$id" "$RETRAIN_ATTEMPT" > "$RETRAIN_RESULT"
    "#);
    spec.env.insert(
        "MLFLOW_TRACKING_URI".into(),
        "http://{public_ip}:5000".into(),
    );
    spec.workdir = Some(workdir.path().to_path_buf());
    let trainer = CommandTrainer::new(spec, state.path().to_path_buf()).unwrap();
    let req = request("run-1", 2, Some(lease("10.0.0.7")));

    let handle = trainer.start(&req).await.unwrap();
    assert_eq!(handle.kind, "command");
    assert!(handle.data["start_time"].as_u64().is_some());
    let outcome = trainer.wait(&req, &handle).await.unwrap();

    let TrainingOutcome::Finished(candidate) = outcome else {
        panic!("expected a result, got {outcome:?}");
    };
    let cwd = workdir.path().canonicalize().unwrap();
    assert_eq!(
        candidate.id,
        format!(
            "segmentation|run-1|2|run-1/train/2|owner/wms|v20251030_115250|10.0.0.7|http://10.0.0.7:5000|{}",
            cwd.display()
        )
    );
    assert_eq!(candidate.metrics["dice"], 0.81);
    assert_eq!(candidate.metrics["iou"], 2.0);
    let log = std::fs::read_to_string(state.path().join("jobs/run-1_train_2.log")).unwrap();
    assert!(log.contains("training v20251030_115250"), "{log}");
    assert!(state.path().join("jobs/run-1_train_2.result.json").exists());
    // The manifest records how the job ended.
    assert_eq!(trainer.job_exit(&handle).as_deref(), Some("exit status 0"));
}

#[tokio::test]
async fn a_placeholder_without_a_lease_is_a_config_error_naming_the_variable() {
    let state = tempfile::tempdir().unwrap();
    let mut spec = sh("exit 0");
    spec.env.insert(
        "MLFLOW_TRACKING_URI".into(),
        "http://{public_ip}:5000".into(),
    );
    let trainer = CommandTrainer::new(spec, state.path().to_path_buf()).unwrap();
    let err = trainer.start(&request("r", 1, None)).await.unwrap_err();
    assert!(matches!(err, PortError::Config(_)), "{err:?}");
    assert!(err.message().contains("MLFLOW_TRACKING_URI"), "{err}");
}

#[tokio::test]
async fn a_stale_result_file_is_removed_before_the_start() {
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(state.path().join("jobs")).unwrap();
    std::fs::write(
        state.path().join("jobs/run-s_train_1.result.json"),
        r#"{"candidate":"stale","metrics":{}}"#,
    )
    .unwrap();
    let trainer = CommandTrainer::new(sh("exit 0"), state.path().to_path_buf()).unwrap();
    let req = request("run-s", 1, None);
    let handle = trainer.start(&req).await.unwrap();
    let err = trainer.wait(&req, &handle).await.unwrap_err();
    assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
}

#[tokio::test]
async fn a_non_zero_exit_fails_with_the_status_and_the_stderr_tail() {
    let state = tempfile::tempdir().unwrap();
    let script = r#"for i in $(seq 1 50); do echo "noise $i"; done; echo "RuntimeError: CUDA out of memory" >&2; exit 3"#;
    let trainer = CommandTrainer::new(sh(script), state.path().to_path_buf()).unwrap();
    let req = request("run-f", 1, None);
    let handle = trainer.start(&req).await.unwrap();
    let err = trainer.wait(&req, &handle).await.unwrap_err();
    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    let msg = err.message();
    assert!(msg.contains("exit status 3"), "{msg}");
    assert!(msg.contains("CUDA out of memory"), "{msg}");
    assert!(
        msg.contains("noise 50") && !msg.contains("noise 10\n"),
        "only the tail: {msg}"
    );
    assert!(msg.contains("`sh`"), "names the command: {msg}");
    assert_eq!(trainer.job_exit(&handle).as_deref(), Some("exit status 3"));
    // A job this instance never waited for: unknown.
    let other = CommandTrainer::new(sh("true"), state.path().to_path_buf()).unwrap();
    assert_eq!(other.job_exit(&handle), None);
}

#[tokio::test]
async fn exit_zero_without_a_result_names_the_missing_file() {
    let state = tempfile::tempdir().unwrap();
    let trainer = CommandTrainer::new(sh("echo done"), state.path().to_path_buf()).unwrap();
    let req = request("run-n", 1, None);
    let handle = trainer.start(&req).await.unwrap();
    let err = trainer.wait(&req, &handle).await.unwrap_err();
    assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
    assert!(err.message().contains("run-n_train_1.result.json"), "{err}");
    assert!(err.message().contains("no result file"), "{err}");
}

#[tokio::test]
async fn invalid_result_files_are_rejected_naming_the_file_and_the_problem() {
    let cases = [
        (
            "echo 'not json' > \"$RETRAIN_RESULT\"",
            "not valid result JSON",
        ),
        (
            r#"echo '{"candidate":"c","metrics":{"dice":NaN' > "$RETRAIN_RESULT""#,
            "not valid result JSON",
        ),
        (
            r#"echo '{"candidate":"c","metrics":{"dice":"high"}}' > "$RETRAIN_RESULT""#,
            "metric `dice`",
        ),
        (
            r#"echo '{"candidate":"c","metrics":{"iou":null}}' > "$RETRAIN_RESULT""#,
            "metric `iou`",
        ),
        (
            r#"echo '{"metrics":{"iou":1}}' > "$RETRAIN_RESULT""#,
            "candidate",
        ),
    ];
    let state = tempfile::tempdir().unwrap();
    for (i, (script, needle)) in cases.iter().enumerate() {
        let trainer = CommandTrainer::new(sh(script), state.path().to_path_buf()).unwrap();
        let req = request(&format!("run-i{i}"), 1, None);
        let handle = trainer.start(&req).await.unwrap();
        let err = trainer.wait(&req, &handle).await.unwrap_err();
        assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
        assert!(err.message().contains(needle), "{script}: {err}");
        assert!(
            err.message()
                .contains(&format!("run-i{i}_train_1.result.json")),
            "names the file: {err}"
        );
    }
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let state = tempfile::tempdir().unwrap();
    let pidfile = state.path().join("child.pid");
    let mut spec = sh(r#"sleep 300 & echo $! > "$PIDFILE"; wait"#);
    spec.env
        .insert("PIDFILE".into(), pidfile.to_string_lossy().into_owned());
    spec.timeout = Some(Duration::from_secs(1));
    let trainer = CommandTrainer::new(spec, state.path().to_path_buf()).unwrap();
    let req = request("run-t", 1, None);
    let handle = trainer.start(&req).await.unwrap();
    let child = read_pid(&pidfile).await;
    assert!(running(child));

    let err = trainer.wait(&req, &handle).await.unwrap_err();
    assert!(err.message().contains("timed out after 1s"), "{err}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!running(child), "the script's child `sleep` survived");
    assert!(!running(handle_pid(&handle)));
}

#[tokio::test]
async fn cancel_kills_the_group_and_is_idempotent() {
    let state = tempfile::tempdir().unwrap();
    let pidfile = state.path().join("child.pid");
    let mut spec = sh(r#"sleep 300 & echo $! > "$PIDFILE"; wait"#);
    spec.env
        .insert("PIDFILE".into(), pidfile.to_string_lossy().into_owned());
    let trainer = CommandTrainer::new(spec, state.path().to_path_buf()).unwrap();
    let req = request("run-c", 1, None);
    let handle = trainer.start(&req).await.unwrap();
    let child = read_pid(&pidfile).await;

    trainer.cancel(&handle).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!running(child), "the script's child `sleep` survived");
    assert!(!running(handle_pid(&handle)));
    trainer.cancel(&handle).await.unwrap();

    let err = trainer.wait(&req, &handle).await.unwrap_err();
    assert!(err.message().contains("signal"), "{err}");
}

#[tokio::test]
async fn a_new_process_awaits_a_job_started_by_an_earlier_one() {
    let state = tempfile::tempdir().unwrap();
    let script =
        r#"sleep 1; printf '{"candidate":"resumed","metrics":{"dice":0.9}}' > "$RETRAIN_RESULT""#;
    let req = request("run-r", 1, None);
    let handle = {
        let first = CommandTrainer::new(sh(script), state.path().to_path_buf()).unwrap();
        first.start(&req).await.unwrap()
        // `first` (and its child handle) is dropped here, as in a crash.
    };
    // The journaled handle survives a round trip through JSON.
    let handle: TrainingHandle =
        serde_json::from_str(&serde_json::to_string(&handle).unwrap()).unwrap();
    assert!(running(handle_pid(&handle)), "still running when resumed");

    let second = CommandTrainer::new(sh(script), state.path().to_path_buf()).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), second.wait(&req, &handle))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        outcome,
        TrainingOutcome::Finished(Candidate {
            id: "resumed".into(),
            metrics: Metrics::from([("dice".to_owned(), 0.9)]),
        })
    );
}

#[tokio::test]
async fn a_resumed_wait_keeps_the_timeout_budget_and_stops_the_earlier_job() {
    let state = tempfile::tempdir().unwrap();
    let mut spec = sh("sleep 300");
    spec.timeout = Some(Duration::from_secs(1));
    let req = request("run-rt", 1, None);
    let handle = {
        let first = CommandTrainer::new(spec.clone(), state.path().to_path_buf()).unwrap();
        first.start(&req).await.unwrap()
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let pid = handle_pid(&handle);
    assert!(running(pid));
    // The budget counts from the start: the new process stops it at once,
    // through /proc and the process group (it has no child handle).
    let second = CommandTrainer::new(spec, state.path().to_path_buf()).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), second.wait(&req, &handle))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.message().contains("timed out after 1s"), "{err}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!running(pid), "the earlier job survived");
}

#[tokio::test]
async fn a_job_gone_without_a_result_is_lost_for_a_new_process() {
    let state = tempfile::tempdir().unwrap();
    let req = request("run-l", 1, None);
    let handle = {
        let first = CommandTrainer::new(
            sh("echo 'host rebooted'; sleep 0.2"),
            state.path().to_path_buf(),
        )
        .unwrap();
        first.start(&req).await.unwrap()
    };
    let second = CommandTrainer::new(sh("true"), state.path().to_path_buf()).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), second.wait(&req, &handle))
        .await
        .unwrap()
        .unwrap();
    let TrainingOutcome::Lost { reason } = outcome else {
        panic!("expected Lost, got {outcome:?}");
    };
    assert!(reason.contains("run-l_train_1.result.json"), "{reason}");
    assert!(reason.contains("host rebooted"), "{reason}");
}

#[tokio::test]
async fn a_reused_pid_is_not_mistaken_for_the_job() {
    let state = tempfile::tempdir().unwrap();
    let trainer = CommandTrainer::new(sh("true"), state.path().to_path_buf()).unwrap();
    // Our own pid is alive, but with another start time it is not the job.
    let handle = TrainingHandle {
        kind: "command".into(),
        data: serde_json::json!({
            "pid": std::process::id(), "pgid": std::process::id(), "start_time": 1,
            "result_path": state.path().join("none.json"), "log_path": state.path().join("none.log"),
            "argv0": "python"
        }),
    };
    let req = request("run-p", 1, None);
    let outcome = tokio::time::timeout(Duration::from_secs(5), trainer.wait(&req, &handle))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(outcome, TrainingOutcome::Lost { .. }),
        "{outcome:?}"
    );
    // Cancelling it must not signal this test process.
    trainer.cancel(&handle).await.unwrap();

    let foreign = TrainingHandle {
        kind: "hf-space".into(),
        data: serde_json::json!({}),
    };
    assert!(trainer.wait(&req, &foreign).await.is_err());
}

// ------------------------------------------------ trainer: idempotent start

/// A trainer script that counts its starts in `$COUNT`, runs `secs` and
/// writes a result naming the job key.
fn counting(state: &Path, secs: f64) -> (CommandSpec, PathBuf) {
    let count = state.join("count");
    let mut spec = sh(&format!(
        r#"echo "$RETRAIN_JOB_KEY" >> "$COUNT"; sleep {secs}; printf '{{"candidate":"%s","metrics":{{"dice":0.5}}}}' "$RETRAIN_JOB_KEY" > "$RETRAIN_RESULT""#
    ));
    spec.env
        .insert("COUNT".into(), count.to_string_lossy().into_owned());
    (spec, count)
}

fn starts(count: &Path) -> Vec<String> {
    std::fs::read_to_string(count)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn start_is_idempotent_for_the_job_key() {
    let state = tempfile::tempdir().unwrap();
    let (spec, count) = counting(state.path(), 1.0);
    let trainer = CommandTrainer::new(spec.clone(), state.path().to_path_buf()).unwrap();
    let req = request("run-k", 1, None);

    let first = trainer.start(&req).await.unwrap();
    let again = trainer.start(&req).await.unwrap();
    assert_eq!(first, again, "the same key must give the same handle");
    // A new orchestrator process (crash after the start, before the journal
    // write) calling start for the same key adopts the running job.
    let resumed = CommandTrainer::new(spec.clone(), state.path().to_path_buf()).unwrap();
    assert_eq!(resumed.start(&req).await.unwrap(), first);
    assert!(running(handle_pid(&first)));

    let outcome = trainer.wait(&req, &first).await.unwrap();
    assert!(
        matches!(&outcome, TrainingOutcome::Finished(c) if c.id == "run-k/train/1"),
        "{outcome:?}"
    );
    // After it finished: still the same job; `wait` reads its result.
    let later = CommandTrainer::new(spec.clone(), state.path().to_path_buf()).unwrap();
    let handle = later.start(&req).await.unwrap();
    assert_eq!(handle, first);
    assert_eq!(later.wait(&req, &handle).await.unwrap(), outcome);
    assert_eq!(starts(&count), ["run-k/train/1"], "spawned exactly once");

    // Another key is another job.
    let mut next = request("run-k", 1, None);
    next.job_key = JobKey("run-k/train/2".into());
    let second = trainer.start(&next).await.unwrap();
    assert_ne!(handle_pid(&second), handle_pid(&first));
    let outcome = trainer.wait(&next, &second).await.unwrap();
    assert!(matches!(outcome, TrainingOutcome::Finished(c) if c.id == "run-k/train/2"));
    assert_eq!(starts(&count), ["run-k/train/1", "run-k/train/2"]);
}

#[tokio::test]
async fn a_job_gone_without_a_result_is_adopted_not_restarted() {
    let state = tempfile::tempdir().unwrap();
    let count = state.path().join("count");
    let mut spec = sh(r#"echo x >> "$COUNT"; exit 0"#);
    spec.env
        .insert("COUNT".into(), count.to_string_lossy().into_owned());
    let req = request("run-g", 1, None);
    let handle = {
        let first = CommandTrainer::new(spec.clone(), state.path().to_path_buf()).unwrap();
        first.start(&req).await.unwrap()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = CommandTrainer::new(spec, state.path().to_path_buf()).unwrap();
    assert_eq!(second.start(&req).await.unwrap(), handle);
    let outcome = second.wait(&req, &handle).await.unwrap();
    assert!(
        matches!(outcome, TrainingOutcome::Lost { .. }),
        "{outcome:?}"
    );
    assert_eq!(starts(&count).len(), 1);
}

/// The crash window: the claim was written, the job spawned, and the
/// orchestrator died before recording the pid. The next start finds the job
/// by its environment instead of spawning a second one.
#[tokio::test]
async fn a_claim_without_a_pid_adopts_the_job_found_by_its_environment() {
    let state = tempfile::tempdir().unwrap();
    let (spec, count) = counting(state.path(), 1.0);
    let jobs = state.path().join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    let result = jobs.join("run-w_train_1.result.json");
    let claim = serde_json::json!({
        "key": "run-w/train/1", "claimed_at": Utc::now(), "job": null
    });
    std::fs::write(jobs.join("run-w_train_1.job.json"), claim.to_string()).unwrap();
    // What the crashed orchestrator had spawned.
    let mut orphan = std::process::Command::new("sh")
        .args(["-c", &spec.argv[2]])
        .env("COUNT", &count)
        .env("RETRAIN_JOB_KEY", "run-w/train/1")
        .env("RETRAIN_RESULT", &result)
        .process_group(0)
        .spawn()
        .unwrap();
    let _ = loop_until_lines_text(&count, 1).await;

    let trainer = CommandTrainer::new(spec.clone(), state.path().to_path_buf()).unwrap();
    let req = request("run-w", 1, None);
    let handle = trainer.start(&req).await.unwrap();
    assert_eq!(handle_pid(&handle), orphan.id());
    assert_eq!(trainer.start(&req).await.unwrap(), handle, "now recorded");
    // Reap it as its real parent would have (the trainer polls /proc).
    let reaper = std::thread::spawn(move || orphan.wait());
    let outcome = trainer.wait(&req, &handle).await.unwrap();
    assert!(matches!(outcome, TrainingOutcome::Finished(c) if c.id == "run-w/train/1"));
    reaper.join().unwrap().unwrap();
    assert_eq!(starts(&count).len(), 1, "never spawned a second job");

    // A claim whose job is not running and left no result: started now.
    let claim = serde_json::json!({
        "key": "run-w/train/2", "claimed_at": Utc::now(), "job": null
    });
    std::fs::write(jobs.join("run-w_train_2.job.json"), claim.to_string()).unwrap();
    let mut next = request("run-w", 1, None);
    next.job_key = JobKey("run-w/train/2".into());
    let handle = trainer.start(&next).await.unwrap();
    assert!(handle_pid(&handle) > 0);
    trainer.wait(&next, &handle).await.unwrap();
    assert_eq!(starts(&count).len(), 2);
}

async fn loop_until_lines_text(path: &Path, n: usize) -> Vec<String> {
    for _ in 0..200 {
        let lines = starts(path);
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} never reached {n} lines", path.display());
}

// ------------------------------------------------ trainer: process groups

#[tokio::test]
async fn background_children_are_stopped_when_the_main_process_exits() {
    let state = tempfile::tempdir().unwrap();
    let pidfile = state.path().join("child.pid");
    // The child even clears its environment (no marker to recognise it by).
    let mut spec = sh(
        r#"env -i "$(command -v sleep)" 1000 & echo $! > "$PIDFILE"; printf '{"candidate":"c","metrics":{}}' > "$RETRAIN_RESULT""#,
    );
    spec.env
        .insert("PIDFILE".into(), pidfile.to_string_lossy().into_owned());
    let trainer = CommandTrainer::new(spec.clone(), state.path().to_path_buf()).unwrap();
    let req = request("run-o", 1, None);
    let handle = trainer.start(&req).await.unwrap();
    let outcome = trainer.wait(&req, &handle).await.unwrap();
    assert!(
        matches!(outcome, TrainingOutcome::Finished(_)),
        "{outcome:?}"
    );
    let child = read_pid(&pidfile).await;
    assert!(
        !running(child),
        "the background `sleep 1000` outlived the job"
    );

    // Same for a job awaited by a later orchestrator process (no child handle).
    std::fs::remove_file(&pidfile).unwrap();
    spec.argv[2] = format!("sleep 0.5; {}", spec.argv[2]);
    let req = request("run-o2", 1, None);
    let handle = {
        let first = CommandTrainer::new(spec.clone(), state.path().to_path_buf()).unwrap();
        first.start(&req).await.unwrap()
    };
    let second = CommandTrainer::new(spec, state.path().to_path_buf()).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(15), second.wait(&req, &handle))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(outcome, TrainingOutcome::Finished(_)),
        "{outcome:?}"
    );
    let child = read_pid(&pidfile).await;
    assert!(
        !running(child),
        "the background `sleep 1000` outlived the resumed job"
    );
}

// ------------------------------------------------ trainer: result files

async fn result_error(script: &str, run: &str) -> (PortError, PathBuf) {
    let state = tempfile::tempdir().unwrap();
    let mut spec = sh(script);
    spec.timeout = Some(Duration::from_secs(10));
    let trainer = CommandTrainer::new(spec, state.path().to_path_buf()).unwrap();
    let req = request(run, 1, None);
    let handle = trainer.start(&req).await.unwrap();
    let started = std::time::Instant::now();
    let err = trainer.wait(&req, &handle).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "blocked: {err}");
    // Keep the directory alive until the assertions are done.
    let dir = state.keep();
    (err, dir)
}

#[tokio::test]
async fn an_oversized_result_file_is_rejected() {
    let (err, dir) = result_error(
        r#"head -c 2000000 /dev/zero | tr '\0' ' ' > "$RETRAIN_RESULT""#,
        "run-big",
    )
    .await;
    assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
    let msg = err.message();
    assert!(msg.contains("run-big_train_1.result.json"), "{msg}");
    assert!(msg.contains("1 MiB"), "{msg}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_fifo_result_file_is_rejected_without_blocking() {
    let (err, dir) = result_error(r#"mkfifo "$RETRAIN_RESULT""#, "run-fifo").await;
    assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
    let msg = err.message();
    assert!(msg.contains("run-fifo_train_1.result.json"), "{msg}");
    assert!(
        msg.contains("FIFO") && msg.contains("regular file"),
        "{msg}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_symlinked_result_file_outside_the_state_dir_is_rejected() {
    let (err, dir) = result_error(r#"ln -s /etc/passwd "$RETRAIN_RESULT""#, "run-ln").await;
    assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
    let msg = err.message();
    assert!(msg.contains("run-ln_train_1.result.json"), "{msg}");
    assert!(
        msg.contains("symbolic link") && msg.contains("outside the job's state directory"),
        "{msg}"
    );
    assert!(!msg.contains("root:"), "quoted the target's content: {msg}");
    std::fs::remove_dir_all(dir).unwrap();

    // A link within the state directory is fine.
    let state = tempfile::tempdir().unwrap();
    let script = r#"printf '{"candidate":"linked","metrics":{}}' > "$RETRAIN_RESULT.real"; ln -s "$RETRAIN_RESULT.real" "$RETRAIN_RESULT""#;
    let trainer = CommandTrainer::new(sh(script), state.path().to_path_buf()).unwrap();
    let req = request("run-ln2", 1, None);
    let handle = trainer.start(&req).await.unwrap();
    let outcome = trainer.wait(&req, &handle).await.unwrap();
    assert!(matches!(outcome, TrainingOutcome::Finished(c) if c.id == "linked"));
}

#[tokio::test]
async fn python_nan_and_infinity_in_results_become_non_finite_metrics() {
    let state = tempfile::tempdir().unwrap();
    let script = r#"printf '%s' '{"candidate": "c1", "metrics": {"acc": NaN, "f1": Infinity, "loss": -Infinity}, "note": "NaN stays text"}' > "$RETRAIN_RESULT""#;
    let trainer = CommandTrainer::new(sh(script), state.path().to_path_buf()).unwrap();
    let req = request("run-nan", 1, None);
    let handle = trainer.start(&req).await.unwrap();
    let TrainingOutcome::Finished(candidate) = trainer.wait(&req, &handle).await.unwrap() else {
        panic!("expected a result");
    };
    assert_eq!(candidate.id, "c1");
    assert!(candidate.metrics["acc"].is_nan());
    assert_eq!(candidate.metrics["f1"], f64::INFINITY);
    assert_eq!(candidate.metrics["loss"], f64::NEG_INFINITY);

    // A string containing "NaN" is untouched.
    let script = r#"printf '%s' '{"candidate": "NaN-Infinity", "metrics": {"acc": 0.9}}' > "$RETRAIN_RESULT""#;
    let trainer = CommandTrainer::new(sh(script), state.path().to_path_buf()).unwrap();
    let req = request("run-nan2", 1, None);
    let handle = trainer.start(&req).await.unwrap();
    let TrainingOutcome::Finished(candidate) = trainer.wait(&req, &handle).await.unwrap() else {
        panic!("expected a result");
    };
    assert_eq!(candidate.id, "NaN-Infinity");
    assert_eq!(candidate.metrics["acc"], 0.9);
}

// ------------------------------------------------ trainer: secret scrubbing

#[tokio::test]
async fn secrets_in_the_output_are_scrubbed_from_errors() {
    const HF: &str = "hf_very_secret_token_value";
    const DB_PASSWORD: &str = "db-pa55word-xyz";
    let state = tempfile::tempdir().unwrap();
    let mut spec = sh(r#"echo "token=$HF_TOKEN" >&2; echo "url=$DATABASE_URL" >&2; exit 1"#);
    spec.env.insert("HF_TOKEN".into(), HF.into());
    // Not a secret-looking name: only the configured secret catches it.
    spec.env.insert(
        "DATABASE_URL".into(),
        format!("postgres://app:{DB_PASSWORD}@db/feedback"),
    );
    let scrubber = Scrubber::empty().with_secrets(retrain_adapters::scrub::url_secrets(&format!(
        "postgres://app:{DB_PASSWORD}@db/feedback"
    )));
    let trainer = CommandTrainer::new(spec.clone(), state.path().to_path_buf())
        .unwrap()
        .with_scrubber(scrubber.clone());
    let req = request("run-sec", 1, None);
    let handle = trainer.start(&req).await.unwrap();
    let err = trainer.wait(&req, &handle).await.unwrap_err();
    let msg = err.message();
    assert!(msg.contains("token=***"), "{msg}");
    assert!(msg.contains("url=***"), "{msg}");
    assert!(!msg.contains(HF) && !msg.contains(DB_PASSWORD), "{msg}");

    // The prepare job's failure stage goes through the same scrubber.
    let space = CommandSpace::new(spec, state.path().to_path_buf())
        .unwrap()
        .with_scrubber(scrubber);
    space
        .restart(&JobKey("cycle-s/prepare/job".into()))
        .await
        .unwrap();
    let stage = settled(&space).await.to_string();
    assert!(stage.contains("***"), "{stage}");
    assert!(
        !stage.contains(HF) && !stage.contains(DB_PASSWORD),
        "{stage}"
    );
}

// ---------------------------------------------------------------- prepare job

async fn settled(space: &CommandSpace) -> SpaceStage {
    for _ in 0..200 {
        let stage = space.stage().await.unwrap();
        if stage != SpaceStage::Running {
            return stage;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the prepare command never finished");
}

#[tokio::test]
async fn command_space_reports_running_stopped_and_failed() {
    let state = tempfile::tempdir().unwrap();
    let space = CommandSpace::new(
        sh(r#"test "$RETRAIN_PREPARE" = 1 || exit 9; sleep 0.3"#),
        state.path().to_path_buf(),
    )
    .unwrap();
    assert_eq!(
        space.stage().await.unwrap(),
        SpaceStage::Unknown("NOT_STARTED".into())
    );
    space
        .restart(&JobKey("cycle-1/prepare/job".into()))
        .await
        .unwrap();
    assert_eq!(space.stage().await.unwrap(), SpaceStage::Running);
    assert_eq!(settled(&space).await, SpaceStage::Stopped);

    let failing = CommandSpace::new(
        sh(r#"echo progress; echo "no reviewed tickets yet" >&2; exit 4"#),
        state.path().to_path_buf(),
    )
    .unwrap();
    failing
        .restart(&JobKey("cycle-1/prepare/job".into()))
        .await
        .unwrap();
    let stage = settled(&failing).await;
    assert_eq!(
        stage,
        SpaceStage::Error("COMMAND_FAILED: exit status 4: no reviewed tickets yet".into())
    );
    assert!(stage.is_error());
    assert!(failing.describe().starts_with("command: sh -c"));
}

#[tokio::test]
async fn restarting_a_command_space_stops_the_previous_run() {
    let state = tempfile::tempdir().unwrap();
    let pids = state.path().join("pids");
    let mut spec = sh(r#"echo $$ >> "$PIDS"; sleep 300"#);
    spec.env
        .insert("PIDS".into(), pids.to_string_lossy().into_owned());
    let space = CommandSpace::new(spec, state.path().to_path_buf()).unwrap();
    space
        .restart(&JobKey("cycle-1/prepare/job".into()))
        .await
        .unwrap();
    let first = read_pid(&pids).await;
    // A new cycle's restart (a new intent) stops the previous run.
    space
        .restart(&JobKey("cycle-2/prepare/job".into()))
        .await
        .unwrap();
    assert!(!running(first), "the first prepare run survived a restart");
    assert_eq!(space.stage().await.unwrap(), SpaceStage::Running);
    let second = loop_until_lines(&pids, 2).await[1];
    assert!(running(second));
    // Leave nothing behind: a third intent stops the second run too.
    space
        .restart(&JobKey("cycle-3/prepare/job".into()))
        .await
        .unwrap();
    assert!(
        !running(second),
        "the second prepare run survived a restart"
    );
    let third = loop_until_lines(&pids, 3).await[2];
    stop_pid_group(third);
}

#[tokio::test]
async fn a_prepare_restart_runs_once_per_intent() {
    let state = tempfile::tempdir().unwrap();
    let pids = state.path().join("pids");
    let mut spec = sh(r#"echo $$ >> "$PIDS"; sleep 0.5"#);
    spec.env
        .insert("PIDS".into(), pids.to_string_lossy().into_owned());
    let intent = JobKey("cycle-a/prepare/job".into());
    let space = CommandSpace::new(spec.clone(), state.path().to_path_buf()).unwrap();
    space.restart(&intent).await.unwrap();
    // Same intent while it runs: nothing happens.
    space.restart(&intent).await.unwrap();
    let first = loop_until_lines(&pids, 1).await[0];
    assert!(
        running(first),
        "the running job was stopped by a repeated restart"
    );
    // A later orchestrator process with the same intent adopts it.
    let resumed = CommandSpace::new(spec.clone(), state.path().to_path_buf()).unwrap();
    resumed.restart(&intent).await.unwrap();
    assert_eq!(resumed.stage().await.unwrap(), SpaceStage::Running);
    assert_eq!(settled(&space).await, SpaceStage::Stopped);
    assert_eq!(settled(&resumed).await, SpaceStage::Stopped);
    // Same intent after it finished: still nothing.
    space.restart(&intent).await.unwrap();
    let later = CommandSpace::new(spec.clone(), state.path().to_path_buf()).unwrap();
    later.restart(&intent).await.unwrap();
    assert_eq!(settled(&later).await, SpaceStage::Stopped);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(std::fs::read_to_string(&pids).unwrap().lines().count(), 1);

    // A new intent runs it again.
    space
        .restart(&JobKey("cycle-b/prepare/job".into()))
        .await
        .unwrap();
    assert_eq!(loop_until_lines(&pids, 2).await.len(), 2);
    assert_eq!(settled(&space).await, SpaceStage::Stopped);
}

/// Wait until `path` has `n` lines; return them as pids.
async fn loop_until_lines(path: &Path, n: usize) -> Vec<u32> {
    for _ in 0..200 {
        if let Ok(all) = std::fs::read_to_string(path) {
            let pids: Vec<u32> = all.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if pids.len() >= n {
                return pids;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} never reached {n} lines", path.display());
}

/// SIGKILL the process group led by `pid` (test clean-up; no `/bin/kill`).
fn stop_pid_group(pid: u32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

// ---------------------------------------------------------------- metadata

const META: &str = r#"{"dataset_name":"owner/ds","version_tag":"v1","num_samples":40,"created_at":"2025-10-30T11:53:01Z"}"#;

#[tokio::test]
async fn file_metadata_absent_published_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/dataset_metadata.json");
    let store = FileMetadataStore::new(&format!("file://{}", path.display())).unwrap();
    assert_eq!(store.read(None).await.unwrap(), MetadataRead::Absent);

    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, META).unwrap();
    let MetadataRead::Published(version) = store.read(None).await.unwrap() else {
        panic!("expected a published version");
    };
    assert_eq!(version.metadata.version_tag.as_str(), "v1");
    assert_eq!(version.metadata.num_samples, 40);
    let revision = version.revision.clone().unwrap();
    assert_eq!(revision.len(), 64);
    assert_eq!(
        store.read(Some(revision.clone())).await.unwrap(),
        MetadataRead::Unchanged
    );

    std::fs::write(&path, META.replace("\"v1\"", "\"v2\"")).unwrap();
    let MetadataRead::Published(next) = store.read(Some(revision.clone())).await.unwrap() else {
        panic!("expected the new version");
    };
    assert_eq!(next.metadata.version_tag.as_str(), "v2");
    assert_ne!(next.revision.unwrap(), revision);

    // Plain paths work too.
    let plain = FileMetadataStore::new(&path.display().to_string()).unwrap();
    assert!(matches!(
        plain.read(None).await.unwrap(),
        MetadataRead::Published(_)
    ));
}

#[tokio::test]
async fn malformed_metadata_names_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dataset_metadata.json");
    let store = FileMetadataStore::new(&path.display().to_string()).unwrap();

    std::fs::write(&path, "{not json").unwrap();
    let err = store.read(None).await.unwrap_err();
    assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
    assert!(err.message().contains("dataset_metadata.json"), "{err}");

    std::fs::write(
        &path,
        r#"{"dataset_name":"owner/ds","version_tag":"v1","created_at":"2025-10-30T11:53:01Z"}"#,
    )
    .unwrap();
    let err = store.read(None).await.unwrap_err();
    assert!(err.message().contains("`num_samples`"), "{err}");
    assert!(err.message().contains(&path.display().to_string()), "{err}");
}

// ---------------------------------------------------------------- registry

fn candidate(id: &str, dice: f64) -> Candidate {
    Candidate {
        id: id.into(),
        metrics: Metrics::from([("dice".to_owned(), dice)]),
    }
}

#[tokio::test]
async fn json_registry_promotes_archives_and_is_idempotent_per_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/registry.json");
    let registry = JsonRegistry::open(path.clone(), "wms-unet".into());
    assert_eq!(
        registry.describe(),
        format!("json:{}#wms-unet", path.display())
    );
    assert_eq!(registry.production(None).await.unwrap(), None);
    let err = registry
        .candidate_metrics("nope".into(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::NotFound(_)), "{err:?}");
    assert!(err.message().contains("nope"), "{err}");

    let v1 = registry
        .promote(candidate("c1", 0.8), RunId("run-a".into()), None)
        .await
        .unwrap();
    assert_eq!(v1.version, "1");
    assert_eq!(v1.previous, None);
    let prod = registry.production(None).await.unwrap().unwrap();
    assert_eq!(prod.version, "1");
    assert_eq!(prod.candidate_id.as_deref(), Some("c1"));
    assert_eq!(prod.metrics["dice"], 0.8);

    let v2 = registry
        .promote(candidate("c2", 0.85), RunId("run-b".into()), None)
        .await
        .unwrap();
    assert_eq!(v2.version, "2");
    assert_eq!(v2.previous.as_deref(), Some("1"));
    // The same run again: no new version, the same answer.
    let again = registry
        .promote(candidate("c2", 0.85), RunId("run-b".into()), None)
        .await
        .unwrap();
    assert_eq!(again, v2);

    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let model = &raw["models"]["wms-unet"];
    assert_eq!(model["production"], "2");
    let versions = model["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0]["status"], "archived");
    assert_eq!(versions[1]["status"], "production");
    assert_eq!(versions[1]["run_id"], "run-b");
    assert_eq!(
        registry.production(None).await.unwrap().unwrap().metrics["dice"],
        0.85
    );
    assert_eq!(
        registry.candidate_metrics("c1".into(), None).await.unwrap()["dice"],
        0.8
    );
}

fn rollback(version: &str, run_id: &str) -> RegistryRollback {
    RegistryRollback {
        version: version.into(),
        run_id: RunId(run_id.into()),
        by: "alice".into(),
        reason: "dice regressed".into(),
    }
}

#[tokio::test]
async fn json_registry_rolls_back_marks_the_version_and_is_idempotent_per_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.json");
    let registry = JsonRegistry::open(path.clone(), "m".into());
    assert!(!registry.version_exists("1".into(), None).await.unwrap());
    for (id, run) in [("c1", "run-a"), ("c2", "run-b")] {
        registry
            .promote(candidate(id, 0.8), RunId(run.into()), None)
            .await
            .unwrap();
    }
    assert!(registry.version_exists("1".into(), None).await.unwrap());
    assert!(!registry.version_exists("3".into(), None).await.unwrap());

    let back = registry
        .roll_back(rollback("1", "rollback-1"), None)
        .await
        .unwrap();
    assert_eq!(back.version, "1");
    assert_eq!(back.previous.as_deref(), Some("2"));
    assert_eq!(
        registry.production(None).await.unwrap().unwrap().version,
        "1"
    );
    // The same rollback run again: nothing changes, the same answer.
    let before = std::fs::read_to_string(&path).unwrap();
    let again = registry
        .roll_back(rollback("1", "rollback-1"), None)
        .await
        .unwrap();
    assert_eq!(again, back);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);

    let raw: serde_json::Value = serde_json::from_str(&before).unwrap();
    let model = &raw["models"]["m"];
    assert_eq!(model["production"], "1");
    let versions = model["versions"].as_array().unwrap();
    assert_eq!(versions[0]["status"], "production");
    assert_eq!(versions[1]["status"], "archived");
    assert_eq!(versions[1]["rolled_back_by"], "alice");
    assert_eq!(versions[1]["rolled_back_reason"], "dice regressed");
    assert_eq!(versions[1]["rolled_back_run_id"], "rollback-1");
    assert_eq!(model["rollbacks"][0]["run_id"], "rollback-1");
    assert_eq!(model["rollbacks"][0]["previous"], "2");

    // A promotion after the rollback gets a new number.
    let v3 = registry
        .promote(candidate("c3", 0.9), RunId("run-c".into()), None)
        .await
        .unwrap();
    assert_eq!(
        (v3.version.as_str(), v3.previous.as_deref()),
        ("3", Some("1"))
    );

    let err = registry
        .roll_back(rollback("9", "rollback-2"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::NotFound(_)), "{err:?}");
    assert!(err.message().contains("no version 9"), "{err}");
}

#[tokio::test]
async fn json_registry_reads_run_metrics_logged_by_the_trainer_and_keeps_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.json");
    std::fs::write(
        &path,
        r#"{"runs": {"mlrun-7": {"metrics": {"dice": 0.7, "iou": 0.6}, "params": {"lr": 0.1}}},
            "owner": "team-x"}"#,
    )
    .unwrap();
    let registry = JsonRegistry::open(path.clone(), "m".into());
    let metrics = registry
        .candidate_metrics("mlrun-7".into(), None)
        .await
        .unwrap();
    assert_eq!(metrics["iou"], 0.6);
    let promoted = registry
        .promote(
            Candidate {
                id: "mlrun-7".into(),
                metrics: Metrics::new(),
            },
            RunId("run-x".into()),
            None,
        )
        .await
        .unwrap();
    assert_eq!(promoted.version, "1");
    // Metrics come from the logged run when the candidate carries none.
    assert_eq!(
        registry.production(None).await.unwrap().unwrap().metrics["dice"],
        0.7
    );
    let raw = std::fs::read_to_string(&path).unwrap();
    assert!(raw.contains("team-x") && raw.contains("\"lr\""), "{raw}");
}

#[tokio::test]
async fn a_malformed_registry_is_reported_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.json");
    let garbage = r#"{"models": {"m": {"versions": "oops"}}"#;
    std::fs::write(&path, garbage).unwrap();
    let registry = JsonRegistry::open(path.clone(), "m".into());
    let err = registry
        .promote(candidate("c", 0.9), RunId("run".into()), None)
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
    assert!(err.message().contains("registry.json"), "{err}");
    let err = registry.production(None).await.unwrap_err();
    assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), garbage);

    // A non-numeric metric is named, not silently dropped.
    std::fs::write(
        &path,
        r#"{"models":{"m":{"production":"1","versions":[{"version":"1","candidate":"c","metrics":{"dice":"high"},"status":"production"}]}}}"#,
    )
    .unwrap();
    let err = registry.production(None).await.unwrap_err();
    assert!(err.message().contains("`dice`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_promotions_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("registry.json");
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            // A registry per task: separate lock file handles, as separate
            // processes would have.
            let registry = JsonRegistry::open(path.clone(), "m".into());
            tokio::spawn(async move {
                registry
                    .promote(
                        candidate(&format!("c{i}"), 0.5),
                        RunId(format!("run-{i}")),
                        None,
                    )
                    .await
            })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(task.await.unwrap().unwrap().version);
    }
    versions.sort_by_key(|v| v.parse::<u32>().unwrap());
    assert_eq!(versions, (1..=8).map(|v| v.to_string()).collect::<Vec<_>>());

    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let all = raw["models"]["m"]["versions"].as_array().unwrap();
    assert_eq!(all.len(), 8);
    let production: Vec<_> = all.iter().filter(|v| v["status"] == "production").collect();
    assert_eq!(production.len(), 1);
    assert_eq!(raw["models"]["m"]["production"], production[0]["version"]);
}

// ---------------------------------------------------------------- notifier

#[tokio::test]
async fn log_notifier_accepts_reports() {
    let report = LabelReport::failed_before_run(
        Label::new("department").unwrap(),
        40,
        "count query failed".into(),
    );
    LogNotifier::new().notify(&report).await.unwrap();
    assert_eq!(LogNotifier.describe(), "log");
}

/// What a process killed with `kill -9` left running (a job in its own
/// group, with a background child) is stopped from the job records alone;
/// a finished job's record and a missing directory stop nothing.
#[tokio::test]
async fn jobs_left_running_are_stopped_from_their_records() {
    use retrain_adapters::command::stop_recorded_jobs;

    let state = tempfile::tempdir().unwrap();
    let background = state.path().join("background.pid");
    let script = format!("sleep 300 & echo $! > '{}'; wait", background.display());
    let left = request("run-left", 1, None);
    let handle = {
        let first = CommandTrainer::new(sh(&script), state.path().to_path_buf()).unwrap();
        first.start(&left).await.unwrap()
        // Dropped without waiting or cancelling, as in a `kill -9`.
    };
    let finished = request("run-finished", 1, None);
    {
        let script = r#"printf '{"candidate":"c","metrics":{"dice":0.9}}' > "$RETRAIN_RESULT""#;
        let trainer = CommandTrainer::new(sh(script), state.path().to_path_buf()).unwrap();
        let done = trainer.start(&finished).await.unwrap();
        trainer.wait(&finished, &done).await.unwrap();
    }
    let leader = handle_pid(&handle);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let child: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&background)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        assert!(std::time::Instant::now() < deadline, "no background child");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(running(leader) && running(child));

    let stopped = stop_recorded_jobs(state.path()).await;
    assert_eq!(stopped, vec![left.job_key.to_string()]);
    assert!(!running(leader), "the job's leader survived");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while running(child) {
        assert!(
            std::time::Instant::now() < deadline,
            "the job's background child survived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stop_recorded_jobs(state.path()).await, Vec::<String>::new());
    assert_eq!(
        stop_recorded_jobs(&state.path().join("absent")).await,
        Vec::<String>::new()
    );
}
