//! The `retrain` binary end to end (assert_cmd): the quickstart, plan purity,
//! config errors, secret masking, JSON output.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;
use retrain_tests::{retrain_bin, Project};

/// `retrain` in `dir` (the harness's clean environment), for assert_cmd.
fn retrain(dir: &Path) -> Command {
    Command::from_std(Project::retrain_in(dir))
}

fn json_of(output: &[u8]) -> serde_json::Value {
    serde_json::from_slice(output).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(output)
        )
    })
}

/// File contents; a missing file and an empty one are the same (SQLite
/// creates an empty `-wal` when any connection, even read-only, opens a WAL
/// database: that is not a change of the data).
fn snapshot(paths: &[PathBuf]) -> Vec<Vec<u8>> {
    paths
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_default())
        .collect()
}

/// `retrain args…` in `dir`, which must succeed: its stdout as JSON.
fn json_ok(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = retrain(dir).args(args).assert().success();
    json_of(&out.get_output().stdout)
}

/// `retrain args…` in `dir`, which must succeed: its stdout.
fn text_ok(dir: &Path, args: &[&str]) -> String {
    let out = retrain(dir).args(args).assert().success();
    String::from_utf8_lossy(&out.get_output().stdout).into_owned()
}

/// Adds `line` to the quickstart's one label, `department`.
fn add_to_the_label(quickstart: &Project, line: &str) {
    quickstart.config(
        &quickstart
            .read("retrain.toml")
            .replace("notify = [\"log\"]", &format!("notify = [\"log\"]\n{line}")),
    );
}

/// No model has a production version in the quickstart's JSON registry.
fn nothing_promoted(quickstart: &Project) -> bool {
    !quickstart.join("registry.json").exists() || {
        let models = &quickstart.json("registry.json")["models"];
        models["ticket-router"]["production"].is_null()
            && models["department"]["production"].is_null()
    }
}

#[test]
fn plan_changes_nothing() {
    let dir = Project::quickstart();
    retrain(dir.path()).arg("run").assert().success();
    // New feedback so that the plan would trigger.
    dir.python(&["seed_feedback.py", "--add", "200"]);
    let files: Vec<PathBuf> = [
        ".retrain/state.db",
        ".retrain/state.db-wal",
        "registry.json",
        "datasets/dataset_metadata.json",
    ]
    .iter()
    .map(|f| dir.path().join(f))
    .collect();
    let before = snapshot(&files);
    let history = |dir: &Path| {
        let out = retrain(dir)
            .args(["--output", "json", "runs"])
            .assert()
            .success();
        json_of(&out.get_output().stdout)
    };
    let runs_before = history(dir.path());
    let report = json_ok(dir.path(), &["--output", "json", "plan"]);
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["labels"][0]["status"], "planned", "{report}");
    assert!(
        snapshot(&files) == before,
        "plan modified state, registry or datasets"
    );
    assert_eq!(history(dir.path()), runs_before, "plan journaled something");
}

#[test]
fn plan_on_a_fresh_checkout_creates_no_state() {
    let dir = Project::quickstart();
    retrain(dir.path()).arg("plan").assert().success();
    assert!(
        !dir.path().join(".retrain/state.db").exists(),
        "plan created the state DB"
    );
    assert!(!dir.path().join("registry.json").exists());
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let dir = Project::new();
    dir.config(
        "[labels.a]\nthreshold = \"many\"\nmetadata = \"m.json\"\ntrainer = \"command:true\"\n",
    );
    retrain(dir.path())
        .arg("run")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("labels.a.threshold"))
        .stderr(predicate::str::contains("retrain.toml"));
    retrain(dir.path())
        .args(["config", "check"])
        .assert()
        .code(2);
    retrain(dir.path())
        .env("THRESHOLD_URGENCY", "lots")
        .args(["--config", "missing.toml", "config", "check"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("missing.toml"));
}

#[test]
fn label_defaults_configure_many_labels_and_check_lists_a_few_of_them() {
    let dir = Project::new();
    let mut toml = String::from(
        "[label_defaults]\nthreshold = 10\ncounts = \"none\"\nmetadata = \"file://metadata.json\"\n\
         trainer = \"command:true\"\ngate = \"none\"\n",
    );
    for n in 0..25 {
        toml.push_str(&format!("[labels.l{n:02}]\n"));
    }
    toml.push_str("[labels.own]\nthreshold = 3\n");
    dir.config(&toml).write(
        "metadata.json",
        r#"{"dataset_name": "d", "version_tag": "v1", "num_samples": 100, "created_at": "2026-12-01T00:00:00Z"}"#,
    );

    let plan = json_ok(dir.path(), &["--output", "json", "plan"]);
    let labels = plan["labels"].as_array().unwrap();
    assert_eq!(labels.len(), 26, "{plan}");
    let threshold =
        |name: &str| labels.iter().find(|l| l["label"] == name).unwrap()["threshold"].clone();
    assert_eq!(threshold("l00"), 10);
    assert_eq!(threshold("l24"), 10);
    assert_eq!(threshold("own"), 3);

    let check = text_ok(dir.path(), &["config", "check"]);
    assert!(check.contains("26 label(s): l00, l01,"), "{check}");
    assert!(check.contains("l19, … and 6 more"), "{check}");
    assert!(!check.contains("l20"), "{check}");
    let check = json_ok(dir.path(), &["--output", "json", "config", "check"]);
    assert_eq!(check["labels"].as_array().unwrap().len(), 26, "{check}");
}

#[test]
fn a_bad_github_workflow_trainer_exits_2_naming_the_key() {
    let dir = Project::new();
    let config = |trainer: &str| {
        dir.config(&format!(
            "[labels.seg]\nthreshold = 1\nmetadata = \"m.json\"\ntrainer = {trainer}\n"
        ));
    };
    config(r#"{ github_workflow = { repo = "acme", workflow = "train.yml" } }"#);
    retrain(dir.path())
        .args(["config", "check"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("labels.seg.trainer"))
        .stderr(predicate::str::contains("`repo`"));
    config(r#"{ github_workflow = { repo = "acme/ml", workflow = "train" } }"#);
    retrain(dir.path())
        .arg("run")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("labels.seg.trainer"))
        .stderr(predicate::str::contains("`workflow`"));
    // Valid, but no token to dispatch with: exit 2 naming github.token,
    // before any run starts.
    config(r#"{ github_workflow = { repo = "acme/ml", workflow = "train.yml" } }"#);
    retrain(dir.path())
        .env_remove("GITHUB_TOKEN")
        .env_remove("RETRAIN_GITHUB__TOKEN")
        .arg("run")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("github.token"))
        .stderr(predicate::str::contains("actions: write"));
}

#[test]
fn unknown_label_is_a_usage_error() {
    let dir = Project::quickstart();
    retrain(dir.path())
        .args(["run", "--label", "nope"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unknown label `nope`"));
}

#[test]
fn config_show_never_prints_a_secret() {
    let dir = Project::quickstart();
    let out = retrain(dir.path())
        .env("HF_TOKEN", "hf_very_secret_value")
        .env("GITHUB_TOKEN", "ghp_very_secret_value")
        .env("RETRAIN_STATE", "postgres://user:pg_secret_pw@localhost/db")
        .args(["config", "show"])
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr);
    for secret in [
        "hf_very_secret_value",
        "ghp_very_secret_value",
        "pg_secret_pw",
    ] {
        assert!(!stdout.contains(secret), "{secret} leaked: {stdout}");
        assert!(!stderr.contains(secret), "{secret} leaked: {stderr}");
    }
    assert!(stdout.contains("***"), "{stdout}");
    assert!(stdout.contains("[labels.department]"), "{stdout}");
}

#[test]
fn json_outputs_parse() {
    let dir = Project::quickstart();
    retrain(dir.path()).arg("run").assert().success();
    for args in [
        vec!["--output", "json", "status"],
        vec!["--output", "json", "runs"],
        vec!["--output", "json", "config", "check"],
    ] {
        let out = retrain(dir.path()).args(&args).assert().success();
        json_of(&out.get_output().stdout);
    }
    let runs = json_ok(dir.path(), &["--output", "json", "runs"]);
    let id = runs[0]["run_id"].as_str().unwrap().to_owned();
    let md = text_ok(dir.path(), &["runs", "show", &id, "--format", "md"]);
    assert!(md.contains("## Journal"), "{md}");
    assert!(md.contains("config hash"), "{md}");
}

#[test]
fn github_actions_mode_writes_outputs_and_summary() {
    let dir = Project::quickstart();
    let outputs = dir.path().join("gh_output");
    let summary = dir.path().join("gh_summary");
    let out = retrain(dir.path())
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_OUTPUT", &outputs)
        .env("GITHUB_STEP_SUMMARY", &summary)
        .arg("run")
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout);
    assert!(stdout.contains("::group::retrain department"), "{stdout}");
    let outputs = std::fs::read_to_string(outputs).unwrap();
    assert!(outputs.contains("triggered=true"), "{outputs}");
    assert!(outputs.contains("department_accuracy="), "{outputs}");
    assert!(outputs.contains("run_id="), "{outputs}");
    let summary = std::fs::read_to_string(summary).unwrap();
    assert!(summary.contains("| `department` |"), "{summary}");
}

#[test]
fn version_is_answered_without_config() {
    let dir = Project::new();
    retrain(dir.path())
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn gate_alone_rejects_with_exit_3_and_force_is_recorded() {
    let dir = Project::quickstart();
    retrain(dir.path()).arg("run").assert().success();
    let registry: serde_json::Value = dir.json("registry.json");
    let candidate = registry["models"]["ticket-router"]["versions"][0]["candidate"]
        .as_str()
        .unwrap()
        .to_owned();
    // The production model against itself is not strictly better.
    let outputs = dir.path().join("gh_output");
    retrain(dir.path())
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_OUTPUT", &outputs)
        .args([
            "gate",
            "--label",
            "department",
            "--candidate",
            &candidate,
            "--fail-on-reject",
        ])
        .assert()
        .code(3)
        .stdout(predicate::str::contains("rejected"));
    let written = std::fs::read_to_string(&outputs).unwrap();
    assert!(written.contains("improved=false"), "{written}");
    assert!(written.contains("accuracy="), "{written}");
    let forced = json_ok(
        dir.path(),
        &[
            "--output",
            "json",
            "gate",
            "--label",
            "department",
            "--candidate",
            &candidate,
            "--force",
            "--fail-on-reject",
        ],
    );
    let verdict = &forced["verdict"];
    assert_eq!(verdict["forced"], true, "{verdict}");
    assert_eq!(verdict["passed"], true, "{verdict}");
    // The override is on record in the journal.
    let run_id = forced["run_id"].as_str().expect("the gate run is recorded");
    let shown = json_ok(dir.path(), &["--output", "json", "runs", "show", run_id]);
    assert_eq!(shown["snapshot"]["verdict"]["forced"], true, "{shown}");
    assert_eq!(
        shown["transitions"][0]["event"]["event"], "gate_evaluated",
        "{shown}"
    );
    // A gate run has a manifest too, in the store and in state_dir.
    assert_eq!(shown["manifest"]["verdict"]["forced"], true, "{shown}");
    assert_eq!(shown["manifest"]["candidate"]["id"], candidate.as_str());
    let path = dir
        .path()
        .join(".retrain/runs")
        .join(run_id)
        .join("manifest.json");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("gate manifest.json written")).unwrap();
    assert_eq!(written, shown["manifest"]);
    retrain(dir.path())
        .args([
            "gate",
            "--label",
            "department",
            "--candidate",
            "no-such-candidate",
        ])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no-such-candidate"));
}

#[test]
fn sigterm_saves_state_exits_143_and_the_next_run_resumes() {
    let dir = Project::quickstart();
    dir.write(
        "slow_train.py",
        "import os, runpy, time\n\
         if not os.path.exists('started.marker'):\n\
         \x20   open('started.marker', 'w').close()\n\
         \x20   time.sleep(60)\n\
         runpy.run_path('train.py', run_name='__main__')\n",
    );
    dir.config(&dir.read("retrain.toml").replace(
        r#"["python3", "train.py"]"#,
        r#"["python3", "slow_train.py"]"#,
    ));

    let child = dir
        .retrain()
        .args(["--output", "json", "run"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !dir.path().join("started.marker").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "training never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "did not stop promptly"
    );
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json_of(&out.stdout);
    assert_eq!(report["interrupted"], true);
    assert_eq!(report["labels"][0]["status"], "interrupted", "{report}");

    // The next run resumes the journaled run: the interrupted job was
    // journaled as cancelled and is started again without using up an
    // attempt; the prepare job is not restarted.
    let prepared_before = std::fs::read_dir(dir.path().join("datasets"))
        .unwrap()
        .count();
    let report = json_ok(dir.path(), &["--output", "json", "run"]);
    let label = &report["labels"][0];
    assert_eq!(label["resumed"], true, "{label}");
    assert_eq!(label["status"], "promoted", "{label}");
    assert_eq!(
        label["lost_attempts"].as_array().unwrap().len(),
        0,
        "an interrupt is not a lost attempt: {label}"
    );
    assert!(
        label["candidate"]["id"]
            .as_str()
            .is_some_and(|c| c.ends_with("attempt1")),
        "{label}"
    );
    let prepared_after = std::fs::read_dir(dir.path().join("datasets"))
        .unwrap()
        .count();
    assert_eq!(prepared_before, prepared_after, "the prepare job ran again");
}

#[test]
fn metrics_csv_has_one_row_per_evaluated_candidate_in_order() {
    let dir = Project::quickstart();
    retrain(dir.path()).arg("run").assert().success();
    dir.python(&["seed_feedback.py", "--add", "200"]);
    retrain(dir.path()).arg("run").assert().success();
    // A third run below threshold is skipped: no row for it.
    retrain(dir.path()).arg("run").assert().success();

    let csv = text_ok(
        dir.path(),
        &["metrics", "--label", "department", "--format", "csv"],
    );
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    let header: Vec<&str> = lines[0].split(',').collect();
    for column in [
        "time",
        "dataset_version",
        "candidate",
        "accuracy",
        "production_accuracy",
        "macro_f1",
        "production_macro_f1",
        "verdict",
        "promoted",
    ] {
        assert!(header.contains(&column), "{column} missing: {csv}");
    }
    let col = |row: &str, name: &str| {
        let i = header.iter().position(|h| *h == name).unwrap();
        row.split(',').nth(i).unwrap().to_owned()
    };
    let (first, second) = (lines[1], lines[2]);
    assert!(col(first, "time") <= col(second, "time"), "{csv}");
    assert_ne!(
        col(first, "dataset_version"),
        col(second, "dataset_version")
    );
    for row in [first, second] {
        assert!(col(row, "accuracy").parse::<f64>().is_ok(), "{csv}");
        assert!(["passed", "rejected"].contains(&col(row, "verdict").as_str()));
    }
    // The second candidate was compared with production (the first model
    // if it was promoted).
    if col(first, "promoted") == "true" {
        assert_eq!(
            col(second, "production_accuracy"),
            col(first, "accuracy"),
            "{csv}"
        );
    }

    let json = json_ok(
        dir.path(),
        &["metrics", "--label", "department", "--format", "json"],
    );
    assert_eq!(json.as_array().unwrap().len(), 2, "{json}");
    assert!(json[0]["metrics"]["accuracy"].is_number(), "{json}");
}

#[test]
fn markdown_report_charts_the_gated_metrics_over_the_candidates() {
    let dir = Project::quickstart();
    retrain(dir.path()).arg("run").assert().success();
    dir.python(&["seed_feedback.py", "--add", "200"]);
    let summary = dir.path().join("step_summary.md");
    let out = retrain(dir.path())
        .args(["--output", "json", "run"])
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .env("GITHUB_OUTPUT", dir.path().join("github_output"))
        .assert()
        .success();
    // JSON on stdout comes first, the Actions groups follow it.
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    let json_end = stdout.find("\n}\n").expect("JSON report") + 3;
    let report = json_of(&stdout.as_bytes()[..json_end]);
    let label = &report["labels"][0];
    assert_eq!(label["history"].as_array().unwrap().len(), 2, "{label}");
    let run_id = label["run_id"].as_str().unwrap().to_owned();

    // The step summary has one chart per gated metric, two candidates each.
    let summary = std::fs::read_to_string(&summary).unwrap();
    assert_eq!(summary.matches("xychart-beta").count(), 2, "{summary}");
    assert!(summary.contains("title \"accuracy (higher is better)\""));
    assert!(summary.contains("title \"macro_f1 (higher is better)\""));
    let axis = summary
        .lines()
        .find(|l| l.trim_start().starts_with("x-axis"))
        .unwrap();
    assert_eq!(axis.matches('"').count(), 4, "{axis}");

    // `runs show --format md` draws the same history.
    let md = text_ok(dir.path(), &["runs", "show", &run_id, "--format", "md"]);
    assert_eq!(md.matches("```mermaid\nxychart-beta").count(), 2, "{md}");
    assert!(md.contains(axis), "{md}");
}

#[test]
fn run_manifest_is_written_and_shown() {
    let dir = Project::quickstart();
    let report = json_ok(dir.path(), &["--output", "json", "run"]);
    let run_id = report["labels"][0]["run_id"].as_str().unwrap().to_owned();
    let path = dir
        .path()
        .join(".retrain/runs")
        .join(&run_id)
        .join("manifest.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("manifest.json written")).unwrap();
    let env = &manifest["environment"];
    assert_eq!(
        env["binary_version"],
        env!("CARGO_PKG_VERSION"),
        "{manifest}"
    );
    assert_eq!(env["config_hash"].as_str().unwrap().len(), 64, "{manifest}");
    assert!(!env["git_sha"].as_str().unwrap().is_empty(), "{manifest}");
    assert!(
        env["rustc_version"].as_str().unwrap().starts_with("rustc "),
        "{manifest}"
    );
    assert!(
        env["os"]
            .as_str()
            .unwrap()
            .starts_with(std::env::consts::OS),
        "{manifest}"
    );
    assert_eq!(env["trainer"], "command: python3 train.py", "{manifest}");
    assert_eq!(env["trainer_exit"], "exit status 0", "{manifest}");
    let dataset = &manifest["dataset"];
    assert_eq!(
        dataset["metadata_sha256"].as_str().unwrap().len(),
        64,
        "{manifest}"
    );
    assert!(!dataset["version"].as_str().unwrap().is_empty());
    assert!(
        manifest["candidate"]["metrics"]["accuracy"].is_number(),
        "{manifest}"
    );
    assert!(manifest["verdict"]["passed"].is_boolean(), "{manifest}");
    assert_eq!(manifest["run_id"], run_id.as_str());

    let shown = json_ok(dir.path(), &["runs", "show", &run_id, "--format", "json"]);
    assert_eq!(shown["manifest"], manifest);

    let md = text_ok(dir.path(), &["runs", "show", &run_id, "--format", "md"]);
    for needle in [
        "## Manifest",
        "- git sha: `",
        "- rustc: `rustc ",
        "- trainer: `command: python3 train.py` (exit status 0)",
        "metadata sha256 `",
        "- candidate: `",
        "- verdict: ",
    ] {
        assert!(md.contains(needle), "{needle} missing: {md}");
    }
}

#[test]
fn json_logs_have_the_audit_fields_account_for_the_wall_time_and_hold_no_secret() {
    let dir = Project::quickstart();
    let canary = "hf_canary_7f3a9c2e41d8b5";
    let log_dir = dir.path().join("logs");
    let started = std::time::Instant::now();
    let spawned_at = chrono::Utc::now();
    let out = retrain(dir.path())
        .args(["--log-format", "json", "--log-dir"])
        .arg(&log_dir)
        .arg("run")
        .env("HF_TOKEN", canary)
        .assert()
        .success();
    let wall = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(!stdout.contains(canary) && !stderr.contains(canary));
    let mut total = 0.0;
    let mut stages = std::collections::BTreeSet::new();
    let mut first_line_at = None;
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        first_line_at.get_or_insert_with(|| {
            chrono::DateTime::parse_from_rfc3339(value["ts"].as_str().unwrap()).unwrap()
        });
        for field in [
            "run_id",
            "ts",
            "label",
            "stage",
            "level",
            "git_sha",
            "inputs",
            "outputs",
            "metrics",
            "duration_s",
            "status",
        ] {
            assert!(value.get(field).is_some(), "{field} missing: {line}");
        }
        if value["message"] == "step" {
            total += value["duration_s"].as_f64().unwrap();
            assert!(value["run_id"].is_string() && value["status"].is_string());
            assert!(value["inputs"].is_object() && value["outputs"].is_object());
            stages.insert(value["stage"].as_str().unwrap().to_owned());
        }
    }
    for stage in ["counting", "training", "gating", "done"] {
        assert!(stages.contains(stage), "{stage} missing: {stages:?}");
    }
    // The process's start-up (a debug binary spawned on a loaded machine,
    // the store opened) comes before the first line, which no step can
    // cover; from the first line on, the steps account for the time.
    let start_up = (first_line_at.unwrap().with_timezone(&chrono::Utc) - spawned_at)
        .num_microseconds()
        .unwrap() as f64
        / 1e6;
    let run = wall - start_up.max(0.0);
    assert!(
        (total - run).abs() <= 0.1 * run,
        "steps sum to {total:.3}s, the process took {wall:.3}s, {start_up:.3}s of it before its first line"
    );
    // --log-dir: one JSONL file per stage.
    let gating = std::fs::read_to_string(log_dir.join("gating.log")).unwrap();
    for line in gating.lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(value["stage"], "gating", "{line}");
    }
    for entry in std::fs::read_dir(&log_dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(!text.contains(canary));
    }
}

#[test]
fn history_lists_the_promotions_of_a_label() {
    let dir = Project::quickstart();
    let text = text_ok(dir.path(), &["history", "--label", "department"]);
    assert!(text.contains("no promotion recorded"), "{text}");

    let report = json_ok(dir.path(), &["--output", "json", "run"]);
    assert_eq!(report["labels"][0]["status"], "promoted", "{report}");
    let run_id = report["labels"][0]["run_id"].as_str().unwrap().to_owned();

    let events = json_ok(
        dir.path(),
        &["--output", "json", "history", "--label", "department"],
    );
    let events = events.as_array().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["kind"], "promotion");
    assert_eq!(events[0]["version"], "1");
    assert_eq!(events[0]["by"], "auto");
    assert_eq!(events[0]["run_id"], run_id.as_str());
    assert!(events[0]["verdict"].as_str().is_some(), "{events:?}");

    let text = text_ok(dir.path(), &["history", "--label", "department"]);
    assert!(
        text.contains("promotion version 1 (was none)  by auto"),
        "{text}"
    );
}

#[test]
fn manual_sign_off_waits_then_approve_promotes_once() {
    let dir = Project::quickstart();
    add_to_the_label(&dir, "promote = \"manual\"");
    let report = json_ok(dir.path(), &["--output", "json", "run"]);
    let label = &report["labels"][0];
    assert_eq!(label["status"], "awaiting_approval", "{report}");
    let run_id = label["run_id"].as_str().unwrap().to_owned();
    assert!(nothing_promoted(&dir));
    let text = text_ok(dir.path(), &["run"]);
    assert!(
        text.contains("skipped"),
        "the dataset stays consumed: {text}"
    );

    let out = text_ok(
        dir.path(),
        &["approve", &run_id, "--reason", "reviewed", "--as", "alice"],
    );
    assert!(out.contains("promoted"), "{out}");
    let registry: serde_json::Value = dir.json("registry.json");
    assert_eq!(
        registry["models"]["ticket-router"]["production"], "1",
        "{registry}"
    );

    let out = text_ok(dir.path(), &["approve", &run_id, "--as", "bob"]);
    assert!(out.contains("already approved by alice at"), "{out}");

    let events = json_ok(
        dir.path(),
        &["--output", "json", "history", "--label", "department"],
    );
    assert_eq!(events.as_array().unwrap().len(), 1, "{events}");
    assert_eq!(events[0]["by"], "alice");
    assert_eq!(events[0]["reason"], "reviewed");
    assert_eq!(events[0]["run_id"], run_id.as_str());
}

#[test]
fn manual_approve_then_rollback_restores_production_and_history_shows_both() {
    let dir = Project::quickstart();
    add_to_the_label(&dir, "promote = \"manual\"");
    // Production before retrain: version 1, a model the candidate beats.
    std::fs::write(
        dir.path().join("registry.json"),
        r#"{"models": {"ticket-router": {"production": "1", "versions": [
            {"version": "1", "candidate": "hand-made", "status": "production",
             "metrics": {"accuracy": 0.0, "macro_f1": 0.0}}]}}}"#,
    )
    .unwrap();
    let production = |dir: &Path| {
        let registry: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("registry.json")).unwrap()).unwrap();
        registry["models"]["ticket-router"].clone()
    };

    let report = json_ok(dir.path(), &["--output", "json", "run"]);
    let label = &report["labels"][0];
    assert_eq!(label["status"], "awaiting_approval", "{report}");
    let run_id = label["run_id"].as_str().unwrap().to_owned();
    retrain(dir.path())
        .args(["approve", &run_id, "--reason", "reviewed", "--as", "alice"])
        .assert()
        .success();
    assert_eq!(production(dir.path())["production"], "2");

    // Refusals change nothing and exit 2 with the reason.
    let refused = retrain(dir.path())
        .args([
            "rollback",
            "--label",
            "department",
            "--to",
            "2",
            "--reason",
            "x",
            "--as",
            "bob",
        ])
        .assert()
        .code(2);
    let stderr = String::from_utf8_lossy(&refused.get_output().stderr).to_string();
    assert!(stderr.contains("already production"), "{stderr}");
    retrain(dir.path())
        .args(["rollback", "--label", "department"])
        .assert()
        .code(2);

    let out = text_ok(
        dir.path(),
        &[
            "rollback",
            "--label",
            "department",
            "--reason",
            "misroutes billing tickets",
            "--as",
            "bob",
        ],
    );
    assert!(
        out.contains(
            "rolled_back — rolled back from version 2 to version 1 by bob because misroutes billing tickets"
        ),
        "{out}"
    );
    let model = production(dir.path());
    assert_eq!(model["production"], "1", "{model}");
    assert_eq!(model["versions"][1]["rolled_back_by"], "bob", "{model}");

    let events = json_ok(
        dir.path(),
        &["--output", "json", "history", "--label", "department"],
    );
    assert_eq!(events.as_array().unwrap().len(), 2, "{events}");
    assert_eq!(events[0]["kind"], "promotion");
    assert_eq!(
        (&events[0]["version"], &events[0]["by"]),
        (&"2".into(), &"alice".into())
    );
    assert_eq!(events[0]["reason"], "reviewed");
    assert_eq!(events[1]["kind"], "rollback");
    assert_eq!(events[1]["version"], "1");
    assert_eq!(events[1]["previous_version"], "2");
    assert_eq!(events[1]["by"], "bob");
    assert_eq!(events[1]["reason"], "misroutes billing tickets");
    assert_eq!(events[1]["candidate_run"], serde_json::Value::Null);
    let text = text_ok(dir.path(), &["history", "--label", "department"]);
    assert!(
        text.contains("rollback  version 1 (was 2)  by bob: misroutes billing tickets"),
        "{text}"
    );

    // Nothing further back (2 was rolled back from): refused, exit 2.
    let again = retrain(dir.path())
        .args([
            "rollback",
            "--label",
            "department",
            "--reason",
            "again",
            "--as",
            "bob",
        ])
        .assert()
        .code(2);
    let stderr = String::from_utf8_lossy(&again.get_output().stderr).to_string();
    assert!(stderr.contains("no earlier production version"), "{stderr}");

    // The rolled-back candidate's dataset stays consumed: no re-promotion.
    let text = text_ok(dir.path(), &["run"]);
    assert!(text.contains("skipped"), "{text}");
    assert_eq!(production(dir.path())["production"], "1");
    let text = text_ok(dir.path(), &["runs", "--label", "department"]);
    assert!(text.contains("rolled_back"), "{text}");
}

#[test]
fn approvals_lists_a_waiting_run_until_it_is_rejected() {
    let dir = Project::quickstart();
    add_to_the_label(&dir, "promote = \"manual\"");
    let report = json_ok(dir.path(), &["--output", "json", "run"]);
    let run_id = report["labels"][0]["run_id"].as_str().unwrap().to_owned();

    let rows = json_ok(dir.path(), &["--output", "json", "approvals"]);
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["run_id"], run_id.as_str());
    assert_eq!(rows[0]["label"], "department");
    assert!(rows[0]["candidate"].is_string(), "{rows}");
    assert!(rows[0]["verdict"].is_string(), "{rows}");
    assert!(rows[0]["since"].is_string(), "{rows}");
    let text = text_ok(dir.path(), &["approvals"]);
    assert!(text.contains(&run_id), "{text}");

    let status = json_ok(dir.path(), &["--output", "json", "status"]);
    assert_eq!(status[0]["awaiting_approval"], run_id.as_str(), "{status}");
    let text = text_ok(dir.path(), &["status"]);
    assert!(text.contains("awaiting approval"), "{text}");

    retrain(dir.path())
        .args(["reject", &run_id, "--reason", "x", "--as", "alice"])
        .assert()
        .success();
    let rows = json_ok(dir.path(), &["--output", "json", "approvals"]);
    assert_eq!(rows, serde_json::json!([]), "{rows}");
    let status = json_ok(dir.path(), &["--output", "json", "status"]);
    assert!(status[0]["awaiting_approval"].is_null(), "{status}");
    let text = text_ok(dir.path(), &["approvals"]);
    assert!(text.contains("no runs awaiting approval"), "{text}");
    assert!(nothing_promoted(&dir), "nothing promoted");
}

#[test]
fn completions_for_bash_zsh_and_fish_need_no_config() {
    let dir = Project::new();
    for (shell, marker) in [
        ("bash", "complete -F _retrain"),
        ("zsh", "#compdef retrain"),
        ("fish", "complete -c retrain"),
    ] {
        let script = text_ok(dir.path(), &["completions", shell]);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("config"), "{shell}: subcommands missing");
    }
    retrain(dir.path())
        .args(["completions", "tcsh"])
        .assert()
        .code(2);
}

#[test]
fn no_color_means_no_ansi_escapes_on_stderr() {
    let dir = Project::quickstart();
    // CLICOLOR_FORCE colours a pipe, so that this test can see colours at all.
    let forced = retrain(dir.path())
        .env("CLICOLOR_FORCE", "1")
        .env_remove("NO_COLOR")
        .arg("plan")
        .assert()
        .success();
    let stderr = String::from_utf8_lossy(&forced.get_output().stderr);
    assert!(
        stderr.contains("\x1b["),
        "no colours even when forced: {stderr}"
    );
    let plain = retrain(dir.path())
        .env("CLICOLOR_FORCE", "1")
        .env("NO_COLOR", "1")
        .arg("plan")
        .assert()
        .success();
    let stderr = String::from_utf8_lossy(&plain.get_output().stderr);
    assert!(stderr.contains("reading feedback counts"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "NO_COLOR ignored: {stderr:?}");
}

/// On a terminal (a pty from util-linux's `script`), the per-poll log lines
/// become one live status line per label; piped, they stay log lines (see
/// `quickstart_first_run_trains_and_gates_second_run_skips` in
/// tests/tests/quickstart.rs).
#[test]
fn a_terminal_shows_a_status_line_instead_of_poll_log_lines() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: util-linux `script` is not installed");
        return;
    }
    let dir = Project::quickstart();
    let bin = retrain_bin();
    let config = dir.path().join("retrain.toml");
    let command = format!("'{}' --config '{}' run", bin.display(), config.display());
    let out = std::process::Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .current_dir(dir.path())
        .env("TERM", "xterm")
        .env("RETRAIN_LOG", "info")
        .env_remove("GITHUB_ACTIONS")
        .env_remove("NO_COLOR")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains("len 240/130  version v"),
        "no status line: {screen}"
    );
    assert!(
        !screen.contains("current_len="),
        "poll lines were logged on a terminal: {screen}"
    );
    assert!(screen.contains("promoted version 1"), "{screen}");
}

/// The quickstart with a `dataset_check` whose verdict follows the file
/// `check_mode` (`fail` or anything else); every version it is asked about
/// is appended to `checked.log`.
fn quickstart_with_a_dataset_check() -> Project {
    let dir = Project::quickstart();
    dir.write(
        "check.sh",
        r#"echo "$RETRAIN_DATASET_VERSION" >> checked.log
if [ "$(cat check_mode)" = fail ]; then
  echo "mask_17.png is not binary" >&2
  printf '{"passed": false, "summary": {"bad": 3}, "report_md": "3 samples have an empty text"}' > "$RETRAIN_RESULT"
  exit 1
fi
printf '{"passed": true, "summary": {"checked": 1}, "report_md": "all samples valid"}' > "$RETRAIN_RESULT"
"#,
    );
    add_to_the_label(
        &dir,
        "dataset_check = { command = [\"sh\", \"check.sh\"], timeout = \"1m\" }",
    );
    dir
}

#[test]
fn a_failing_dataset_check_rejects_the_version_then_a_new_version_passes_and_trains() {
    let dir = quickstart_with_a_dataset_check();
    std::fs::write(dir.path().join("check_mode"), "fail").unwrap();
    let report = json_ok(dir.path(), &["--output", "json", "run"]);
    let label = &report["labels"][0];
    assert_eq!(label["status"], "dataset_rejected", "{report}");
    let rejected = label["dataset_version"].as_str().unwrap().to_owned();
    assert_eq!(label["dataset_check"]["passed"], false, "{label}");
    assert_eq!(
        label["dataset_check"]["report_md"], "3 samples have an empty text",
        "{label}"
    );
    let detail = label["dataset_check"]["detail"].as_str().unwrap();
    assert!(detail.contains("mask_17.png is not binary"), "{detail}");
    assert!(label["candidate"].is_null(), "nothing trained: {label}");
    let run_id = label["run_id"].as_str().unwrap().to_owned();
    let trained = std::fs::read_dir(dir.path().join(".retrain/jobs"))
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains("_train_"));
    assert!(!trained, "a training job ran for a rejected dataset");
    let md = text_ok(dir.path(), &["runs", "show", &run_id, "--format", "md"]);
    assert!(md.contains("dataset_rejected"), "{md}");
    assert!(md.contains("3 samples have an empty text"), "{md}");

    // Still failing: the next cycle prepares a new version (the watermark
    // did not move) and checks that one; the rejected one is never checked again.
    let text = text_ok(dir.path(), &["run"]);
    assert!(text.contains("dataset_rejected"), "{text}");
    assert!(text.contains("not checked again"), "{text}");
    let status = json_ok(dir.path(), &["--output", "json", "status"]);
    assert!(
        status[0]["watermark"].is_null(),
        "the watermark did not move: {status}"
    );
    let checked = std::fs::read_to_string(dir.path().join("checked.log")).unwrap();
    let versions: Vec<&str> = checked.lines().collect();
    assert_eq!(versions.len(), 2, "{checked}");
    assert_eq!(versions[0], rejected);
    assert_ne!(
        versions[1], rejected,
        "a rejected version was checked again"
    );
    assert_eq!(status[0]["rejected_version"], versions[1], "{status}");

    // Passing: the new version trains and the check's summary is in the manifest.
    std::fs::write(dir.path().join("check_mode"), "pass").unwrap();
    let report = json_ok(dir.path(), &["--output", "json", "run"]);
    let label = &report["labels"][0];
    let status = label["status"].as_str().unwrap();
    assert!(status == "promoted" || status == "rejected", "{label}");
    assert!(
        label["candidate"]["metrics"]["accuracy"].is_number(),
        "{label}"
    );
    assert_eq!(label["dataset_check"]["passed"], true, "{label}");
    let run_id = label["run_id"].as_str().unwrap();
    let shown = json_ok(dir.path(), &["runs", "show", run_id, "--format", "json"]);
    assert_eq!(
        shown["manifest"]["dataset_check"],
        serde_json::json!({"passed": true, "summary": {"checked": 1}}),
        "{shown}"
    );
    let checked = std::fs::read_to_string(dir.path().join("checked.log")).unwrap();
    assert_eq!(checked.lines().count(), 3, "{checked}");
}

#[test]
fn bad_approval_expires_or_dataset_check_exits_2_naming_the_key() {
    for (line, key) in [
        (
            "approval_expires = \"next week\"",
            "labels.department.approval_expires",
        ),
        (
            "dataset_check = { timeout = \"5m\" }",
            "labels.department.dataset_check",
        ),
        (
            "dataset_check = \"owner/check-space\"",
            "labels.department.dataset_check",
        ),
    ] {
        let dir = Project::quickstart();
        add_to_the_label(&dir, line);
        retrain(dir.path())
            .arg("run")
            .assert()
            .code(2)
            .stderr(predicate::str::contains(key))
            .stderr(predicate::str::contains("retrain.toml"));
    }
}

#[test]
fn a_newer_waiting_candidate_supersedes_the_older_one_which_approve_refuses() {
    let dir = Project::quickstart();
    add_to_the_label(&dir, "promote = \"manual\"\napproval_expires = \"7d\"");
    let waiting = |dir: &Path| {
        let report = json_ok(dir, &["--output", "json", "run"]);
        let label = &report["labels"][0];
        assert_eq!(label["status"], "awaiting_approval", "{report}");
        label["run_id"].as_str().unwrap().to_owned()
    };
    let older = waiting(dir.path());
    dir.python(&["seed_feedback.py", "--add", "200"]);
    let newer = waiting(dir.path());
    // The cycle that superseded the older run rewrote its manifest too.
    let manifest = |run: &str| -> serde_json::Value {
        let path = dir
            .path()
            .join(".retrain/runs")
            .join(run)
            .join("manifest.json");
        serde_json::from_slice(&std::fs::read(&path).expect("manifest.json written")).unwrap()
    };
    assert_eq!(manifest(&older)["outcome"], "superseded");

    let refused = retrain(dir.path())
        .args(["approve", &older, "--as", "alice"])
        .assert()
        .code(1);
    let stderr = String::from_utf8_lossy(&refused.get_output().stderr).into_owned();
    assert!(
        stderr.contains("can no longer be approved") && stderr.contains(&newer),
        "{stderr}"
    );
    let shown = json_ok(dir.path(), &["--output", "json", "runs", "show", &older]);
    assert_eq!(shown["summary"]["outcome"], "superseded", "{shown}");
    assert!(
        shown["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["event"]["event"] == "superseded" && t["event"]["by_run"] == newer.as_str()),
        "{shown}"
    );
    let approvals = json_ok(dir.path(), &["--output", "json", "approvals"]);
    let ids: Vec<&str> = approvals
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["run_id"].as_str())
        .collect();
    assert_eq!(ids, vec![newer.as_str()], "{approvals}");
    retrain(dir.path())
        .args(["approve", &newer, "--as", "alice"])
        .assert()
        .success()
        .stdout(predicate::str::contains("promoted"));
}

/// Two labels training on workers and one that does not, on `state`.
fn worker_labels_config(state: &str) -> String {
    format!(
        r#"state = "{state}"
[labels.segmentation]
threshold = 10
counts = "none"
metadata = "file://metadata.json"
trainer = {{ worker = {{ gpu = 1, gpu_memory = "24G", command = ["python3", "train.py"], timeout = "1h" }} }}
gate = "none"
[labels.intent]
threshold = 10
counts = "none"
metadata = "file://metadata.json"
trainer = {{ worker = {{ command = ["python3", "train.py"], timeout = "1h" }} }}
gate = "none"
[labels.urgency]
threshold = 10
counts = "none"
metadata = "file://metadata.json"
trainer = {{ command = ["true"] }}
gate = "none"
"#
    )
}

/// Fills the job queue at `state` through the store API: `segmentation`
/// has two queued jobs (a GPU request no worker meets), `intent` one held
/// by worker `w-cpu` and one that finished (not shown: it left the queue).
async fn fill_the_job_queue(state: &str) {
    use retrain_adapters::store::{
        open_stores, JobLease, JobQueue, JobReport, NewJob, NewWorker, RemoteJobSpec,
        ResourceRequest, Resources, StoreOptions,
    };
    let jobs = open_stores(state, StoreOptions::default())
        .await
        .unwrap()
        .jobs;
    let now = chrono::Utc::now();
    let job = |key: &str, label: &str, attempt: u32, gpus: Option<u32>, minutes_ago: i64| NewJob {
        job_key: key.into(),
        run_id: key.split('/').next().unwrap().into(),
        label: label.into(),
        attempt,
        spec: RemoteJobSpec {
            dataset_name: "tickets".into(),
            dataset_version: "v1".into(),
            command: vec!["python3".into(), "train.py".into()],
            env: Default::default(),
            timeout_secs: 3600,
            request: ResourceRequest {
                gpus,
                gpu_memory_bytes: gpus.map(|_| 24 << 30),
                ..ResourceRequest::default()
            },
        },
        enqueued_at: now - chrono::Duration::minutes(minutes_ago),
    };
    async fn lease(jobs: &dyn JobQueue) -> String {
        match jobs.lease("w-cpu", chrono::Utc::now()).await.unwrap() {
            JobLease::Assigned(job) => job.job_key,
            other => panic!("expected a job for w-cpu, got {other:?}"),
        }
    }
    jobs.register_worker(&NewWorker {
        worker_id: "w-cpu".into(),
        name: "cpu-box".into(),
        hostname: "cpu-box.lab".into(),
        labels: vec!["intent".into()],
        resources: Resources {
            cpus: 8,
            memory_bytes: 32 << 30,
            ..Resources::default()
        },
        version: "test".into(),
        registered_at: now,
    })
    .await
    .unwrap();
    jobs.enqueue(&job("run-done/train/1", "intent", 1, None, 30))
        .await
        .unwrap();
    assert_eq!(lease(jobs.as_ref()).await, "run-done/train/1");
    jobs.report(
        "run-done/train/1",
        Some("w-cpu"),
        &JobReport::Failed {
            message: "exit status 1".into(),
            exit_status: Some("exit status 1".into()),
        },
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    jobs.enqueue(&job("run-seg/train/1", "segmentation", 1, Some(1), 20))
        .await
        .unwrap();
    jobs.enqueue(&job("run-intent/train/2", "intent", 2, None, 10))
        .await
        .unwrap();
    jobs.enqueue(&job("run-seg2/train/3", "segmentation", 3, Some(1), 5))
        .await
        .unwrap();
    assert_eq!(lease(jobs.as_ref()).await, "run-intent/train/2");
}

/// `retrain status` shows, per label, the remote jobs waiting for or held
/// by a worker (JSON and a second text table), and nothing extra while the
/// queue is empty.
fn status_shows_the_remote_job_queue(state: &str, runtime: &tokio::runtime::Runtime) {
    let project = Project::new();
    project.config(&worker_labels_config(state));
    // The store exists (a never-initialised one reads as empty anyway).
    retrain(project.path()).arg("migrate").assert().success();

    let before = text_ok(project.path(), &["status"]);
    assert!(!before.contains("REMOTE JOB"), "{before}");
    assert_eq!(
        before.lines().count(),
        4,
        "the header and three labels: {before}"
    );
    let rows = json_ok(project.path(), &["--output", "json", "status"]);
    for row in rows.as_array().unwrap() {
        assert_eq!(row["remote_jobs"], serde_json::json!([]), "{row}");
    }

    runtime.block_on(fill_the_job_queue(state));

    let rows = json_ok(project.path(), &["--output", "json", "status"]);
    let of = |label: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["label"] == label)
            .unwrap_or_else(|| panic!("no row for {label}: {rows}"))["remote_jobs"]
            .as_array()
            .unwrap()
            .clone()
    };
    let segmentation = of("segmentation");
    let keys: Vec<_> = segmentation
        .iter()
        .map(|j| j["job_key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["run-seg/train/1", "run-seg2/train/3"],
        "oldest first"
    );
    let first = &segmentation[0];
    assert_eq!(first["state"], "queued");
    assert_eq!(first["attempt"], 1);
    assert_eq!(first["run_id"], "run-seg");
    assert!(first["worker_id"].is_null(), "{first}");
    assert_eq!(first["request"]["gpus"], 1);
    assert_eq!(first["request"]["gpu_memory_bytes"], 24u64 << 30);
    let waited = first["waiting_secs"].as_i64().unwrap();
    assert!(
        (20 * 60..21 * 60).contains(&waited),
        "queued 20 minutes ago: {first}"
    );
    assert_eq!(segmentation[1]["attempt"], 3);

    let intent = of("intent");
    assert_eq!(
        intent.len(),
        1,
        "the finished job left the queue: {intent:?}"
    );
    assert_eq!(intent[0]["job_key"], "run-intent/train/2");
    assert_eq!(intent[0]["state"], "assigned");
    assert_eq!(intent[0]["worker_id"], "w-cpu");
    assert_eq!(intent[0]["attempt"], 2);
    let waited = intent[0]["waiting_secs"].as_i64().unwrap();
    assert!(
        (10 * 60..11 * 60).contains(&waited),
        "waited until assigned: {intent:?}"
    );
    assert!(!intent[0]["assigned_at"].is_null());
    assert_eq!(of("urgency"), Vec::<serde_json::Value>::new());

    let text = text_ok(project.path(), &["status"]);
    let table: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("LABEL") || !l.contains("REMOTE JOB"))
        .collect();
    assert_eq!(table.len(), 4, "a header and three jobs: {text}");
    let line = |key: &str| {
        *table
            .iter()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("no line for {key}: {text}"))
    };
    let seg = line("run-seg/train/1");
    for part in [
        "segmentation",
        "queued",
        " 1 ",
        "20m",
        "gpu≥1, gpu_memory≥24G",
    ] {
        assert!(seg.contains(part), "{part:?} missing: {seg}");
    }
    let held = line("run-intent/train/2");
    for part in ["intent", "assigned", " 2 ", "w-cpu", "10m", "any worker"] {
        assert!(held.contains(part), "{part:?} missing: {held}");
    }

    // Only the selected labels' jobs.
    let urgency = text_ok(project.path(), &["status", "--label", "urgency"]);
    assert!(!urgency.contains("REMOTE JOB"), "{urgency}");
    let intent_only = text_ok(project.path(), &["status", "--label", "intent"]);
    assert!(intent_only.contains("run-intent/train/2"), "{intent_only}");
    assert!(!intent_only.contains("run-seg/train/1"), "{intent_only}");
}

#[test]
fn status_shows_the_remote_job_queue_on_sqlite() {
    let project = Project::new();
    let state = format!("sqlite://{}", project.join("state.db").display());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    status_shows_the_remote_job_queue(&state, &runtime);
}

#[test]
fn status_shows_the_remote_job_queue_on_postgres() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some(state) = runtime.block_on(retrain_tests::services::fresh_postgres_database()) else {
        return;
    };
    status_shows_the_remote_job_queue(&state, &runtime);
}
