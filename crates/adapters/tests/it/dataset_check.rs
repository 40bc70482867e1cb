//! The command dataset check (real `sh` processes): the §6 environment, the
//! verdict from the exit status and `$RETRAIN_RESULT`, strict result files,
//! timeouts and drops that kill the process group, and idempotency per key.

use std::path::Path;
use std::time::Duration;

use retrain_adapters::command::{CommandDatasetCheck, CommandSpec};
use retrain_core::domain::{JobKey, Label, RunId, VersionTag};
use retrain_core::ports::{DatasetCheck, DatasetCheckRequest};

fn check(script: &str, state: &Path) -> CommandDatasetCheck {
    let mut spec = CommandSpec::new(vec!["sh".into(), "-c".into(), script.into()]).unwrap();
    spec.timeout = Some(Duration::from_secs(20));
    spec.env
        .insert("HF_TOKEN".into(), "hf_secret_canary_123".into());
    CommandDatasetCheck::new(spec, state.to_path_buf()).unwrap()
}

fn request(run: &str) -> DatasetCheckRequest {
    DatasetCheckRequest {
        label: Label::new("segmentation").unwrap(),
        run_id: RunId(run.into()),
        job_key: JobKey(format!("{run}/check")),
        dataset_name: "owner/wms".into(),
        dataset_version: VersionTag::new("v20251030_115250"),
    }
}

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn a_passing_check_gets_the_protocol_env_and_its_summary_is_kept() {
    let state = tempfile::tempdir().unwrap();
    let script = r###"cat > "$RETRAIN_RESULT" <<JSON
{"passed": true, "summary": {"pairs": 412, "label": "$RETRAIN_LABEL", "version": "$RETRAIN_DATASET_VERSION", "name": "$RETRAIN_DATASET_NAME", "key": "$RETRAIN_JOB_KEY", "run": "$RETRAIN_RUN_ID"}, "report_md": "## ok\nall pairs valid"}
JSON"###;
    let result = check(script, state.path())
        .check(&request("run-1"))
        .await
        .unwrap();
    assert!(result.passed);
    assert_eq!(result.summary["pairs"], 412);
    assert_eq!(result.summary["label"], "segmentation");
    assert_eq!(result.summary["version"], "v20251030_115250");
    assert_eq!(result.summary["name"], "owner/wms");
    assert_eq!(result.summary["key"], "run-1/check");
    assert_eq!(result.summary["run"], "run-1");
    assert_eq!(result.report_md.as_deref(), Some("## ok\nall pairs valid"));
    assert_eq!(result.detail, None);
    // Exit 0 without a result file passes too.
    let result = check("true", state.path())
        .check(&request("run-2"))
        .await
        .unwrap();
    assert!(result.passed && result.summary.is_empty());
}

#[tokio::test]
async fn a_failing_check_is_a_verdict_with_its_report_and_a_scrubbed_output_tail() {
    let state = tempfile::tempdir().unwrap();
    // Non-zero exit: rejected, even though the file says passed.
    let script = r#"echo "mask_17.png: values {0,128,255} token=$HF_TOKEN" >&2
printf '{"passed": true, "summary": {"bad_masks": 3, "db": "postgres://u:%s@db"}, "report_md": "3 masks are not binary"}' "$HF_TOKEN" > "$RETRAIN_RESULT"
exit 3"#;
    let result = check(script, state.path())
        .check(&request("run-3"))
        .await
        .unwrap();
    assert!(!result.passed);
    assert_eq!(result.summary["bad_masks"], 3);
    // The summary is user output too: a secret it quotes is masked.
    assert_eq!(result.summary["db"], "postgres://u:***@db");
    assert_eq!(result.report_md.as_deref(), Some("3 masks are not binary"));
    let detail = result.detail.unwrap();
    assert!(detail.contains("exit status 3"), "{detail}");
    assert!(detail.contains("mask_17.png"), "{detail}");
    assert!(
        !detail.contains("hf_secret_canary_123"),
        "a secret leaked: {detail}"
    );
    // Exit 0 with passed = false: rejected as well.
    let script = r###"printf '%s' '{"passed": false, "report_md": "## Resolutions\n2 images are 255x255"}' > "$RETRAIN_RESULT""###;
    let result = check(script, state.path())
        .check(&request("run-4"))
        .await
        .unwrap();
    assert!(!result.passed);
    assert!(result.detail.unwrap().contains("\"passed\": false"));
}

#[tokio::test]
async fn an_invalid_or_oversized_result_is_an_error_naming_the_file() {
    let state = tempfile::tempdir().unwrap();
    for (script, names) in [
        (
            r#"echo '{"passed": "yes"}' > "$RETRAIN_RESULT""#,
            "expected a boolean",
        ),
        (
            r#"echo '{"passed": true, "extra": 1}' > "$RETRAIN_RESULT""#,
            "extra",
        ),
        (
            r#"echo 'not json' > "$RETRAIN_RESULT""#,
            "not a valid dataset check result",
        ),
        (
            r#"head -c 2000000 /dev/zero | tr '\0' ' ' > "$RETRAIN_RESULT""#,
            "1 MiB",
        ),
        (r#"mkfifo "$RETRAIN_RESULT""#, "FIFO"),
    ] {
        let err = check(script, state.path())
            .check(&request(&format!("run-{}", names.len())))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(names), "{script}: {err}");
        assert!(err.contains("result.json"), "{script}: {err}");
    }
}

#[tokio::test]
async fn a_completed_check_is_not_run_again_for_its_key() {
    let state = tempfile::tempdir().unwrap();
    let runs = state.path().join("runs");
    let script = format!(r#"echo x >> "{}"; exit 1"#, runs.display());
    let first = check(&script, state.path())
        .check(&request("run-5"))
        .await
        .unwrap();
    // A new adapter instance (a new process) with the same key.
    let again = check(&script, state.path())
        .check(&request("run-5"))
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 1);
    // Another key runs.
    check(&script, state.path())
        .check(&request("run-6"))
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 2);
}

#[tokio::test]
async fn a_timeout_kills_the_group_and_is_an_error() {
    let state = tempfile::tempdir().unwrap();
    let pidfile = state.path().join("child.pid");
    let mut spec = CommandSpec::new(vec![
        "sh".into(),
        "-c".into(),
        format!(r#"sleep 300 & echo $! > "{}"; wait"#, pidfile.display()),
    ])
    .unwrap();
    spec.timeout = Some(Duration::from_secs(1));
    let check = CommandDatasetCheck::new(spec, state.path().to_path_buf()).unwrap();
    let err = check.check(&request("run-7")).await.unwrap_err();
    assert!(err.message().contains("timed out after 1s"), "{err}");
    let child: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!running(child), "the check's child survived its timeout");
}

#[tokio::test]
async fn dropping_a_running_check_kills_its_group() {
    let state = tempfile::tempdir().unwrap();
    let pidfile = state.path().join("child.pid");
    let script = format!(r#"sleep 300 & echo $! > "{}"; wait"#, pidfile.display());
    let check = check(&script, state.path());
    let request = request("run-8");
    let pending = check.check(&request);
    // Interrupted (Ctrl-C, lost lock): the engine drops the future.
    let _ = tokio::time::timeout(Duration::from_millis(500), pending).await;
    let child: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!running(child), "an abandoned check kept running");
}
