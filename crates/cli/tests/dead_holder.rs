//! `kill -9` of a `retrain run` mid-training: the next `retrain run`, started
//! at once, takes the lock of the dead process (same host, pid gone) instead
//! of waiting for `lock_ttl` (60 s by default), resumes the run and awaits
//! or adopts the training job: one training, never two.

use std::process::Stdio;
use std::time::{Duration, Instant};

use retrain_tests::{Project, Ran};

const TRAIN_SH: &str = r#"
echo "$RETRAIN_LABEL" >> starts.log
sleep 3
printf '{"candidate": "cand-1", "metrics": {"accuracy": 0.9}}' > "$RETRAIN_RESULT"
"#;

const CONFIG: &str = r#"
state = "sqlite://state.db"
state_dir = ".retrain"

[poll]
interval = "100ms"
timeout = "1m"

[labels.intent]
threshold = 10
counts = "none"
prepare = "none"
metadata = "file://metadata.json"
trainer = { command = ["sh", "train.sh"], timeout = "2m" }
gate = "none"
"#;

#[test]
fn a_run_killed_mid_training_is_resumed_at_once_and_trains_once() {
    let project = Project::new();
    project.config(CONFIG).write("train.sh", TRAIN_SH).write(
        "metadata.json",
        r#"{"dataset_name": "intents", "version_tag": "v1", "num_samples": 100, "created_at": "2026-01-02T00:00:00Z"}"#,
    );

    let mut first = project
        .retrain()
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while project.lines("starts.log").is_empty() {
        assert!(Instant::now() < deadline, "training never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();

    let began = Instant::now();
    let mut second = project.retrain();
    second.args(["--output", "json", "run"]);
    let second = Ran::now(second);
    let took = began.elapsed();
    let report = second.assert_code(0).json();
    let label = &report["labels"][0];
    assert_eq!(label["status"], "trained", "{label}");
    assert_eq!(label["resumed"], true, "{label}");
    assert_eq!(
        project.lines("starts.log").len(),
        1,
        "the job was awaited or adopted, never started twice"
    );
    // The lock of the dead process was taken at once, not after lock_ttl (60 s).
    assert!(took < Duration::from_secs(20), "resume took {took:?}");
}
