//! The quickstart cycle end to end: a fresh copy of `examples/quickstart`
//! trains, gates and promotes on its first run and skips on the second,
//! from its own directory, from `/` with an absolute `--config` and from a
//! parent directory with a relative one (every path in a config resolves
//! against the config file's directory: `config show` prints them absolute).

use std::path::Path;

use retrain_tests::{Project, Ran};

/// `retrain args…` in `dir`, which must exit 0.
fn retrain_ok(dir: &Path, args: &[&str]) -> Ran {
    let mut command = Project::retrain_in(dir);
    command.args(args);
    let ran = Ran::now(command);
    ran.assert_code(0);
    ran
}

/// The promoted first run of a fresh quickstart at `dir`, from `report`.
fn assert_first_cycle_promoted(report: &serde_json::Value, dir: &Path) {
    let label = &report["labels"][0];
    assert_eq!(label["label"], "department", "{report}");
    assert_eq!(label["status"], "promoted", "{label}");
    assert!(
        dir.join(".retrain/state.db").exists(),
        "the state is next to the config"
    );
    assert!(dir.join("registry.json").exists());
    assert!(dir.join("datasets/dataset_metadata.json").exists());
}

/// The second run: nothing new since the first.
fn assert_second_cycle_skipped(ran: &Ran) {
    assert!(ran.stdout.contains("skipped"), "{}", ran.stdout);
    assert!(ran.stdout.contains("below threshold 40"), "{}", ran.stdout);
}

#[test]
fn quickstart_first_run_trains_and_gates_second_run_skips() {
    let project = Project::quickstart();
    let first = retrain_ok(project.path(), &["--output", "json", "run"]);
    let report = first.json();
    let label = &report["labels"][0];
    assert_eq!(label["label"], "department");
    let status = label["status"].as_str().unwrap();
    assert!(status == "promoted" || status == "rejected", "{label}");
    let verdict = &label["verdict"];
    assert_eq!(
        verdict["comparisons"].as_array().unwrap().len(),
        2,
        "{verdict}"
    );
    assert!(!verdict["reason"].as_str().unwrap().is_empty());
    if status == "promoted" {
        let registry = project.json("registry.json");
        assert_eq!(
            registry["models"]["ticket-router"]["production"], "1",
            "{registry}"
        );
    }
    assert!(
        first.stderr.contains("current_len="),
        "per-poll progress line missing: {}",
        first.stderr
    );

    assert_second_cycle_skipped(&retrain_ok(project.path(), &["run"]));
}

#[test]
fn quickstart_runs_from_the_root_directory_with_an_absolute_config() {
    let project = Project::quickstart();
    let config = std::fs::canonicalize(project.join("retrain.toml")).unwrap();
    let ran = retrain_ok(
        Path::new("/"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--output",
            "json",
            "run",
        ],
    );
    assert_first_cycle_promoted(&ran.json(), project.path());
    // Nothing was written to the working directory.
    assert!(!Path::new("/.retrain").exists());
    assert!(!Path::new("/registry.json").exists());
}

#[test]
fn quickstart_runs_from_another_directory_with_a_relative_config() {
    // Like `retrain run --config examples/quickstart/retrain.toml` from the
    // repository root: the config path is relative to the working directory,
    // every path inside it relative to the config file.
    let parent = Project::new();
    let quickstart = Project::quickstart();
    let nested = parent.join("examples/quickstart");
    std::fs::create_dir_all(&nested).unwrap();
    for entry in std::fs::read_dir(quickstart.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), nested.join(entry.file_name())).unwrap();
    }
    let ran = retrain_ok(
        parent.path(),
        &[
            "--config",
            "examples/quickstart/retrain.toml",
            "--output",
            "json",
            "run",
        ],
    );
    assert_first_cycle_promoted(&ran.json(), &nested);
    let entries: Vec<_> = std::fs::read_dir(parent.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["examples"], "wrote into the working directory");
    // The second run from yet another directory sees the same state.
    let config = nested.join("retrain.toml");
    let ran = retrain_ok(
        &nested.join(".retrain"),
        &["--config", config.to_str().unwrap(), "run"],
    );
    assert_second_cycle_skipped(&ran);
}

#[test]
fn config_show_prints_absolute_paths() {
    let project = Project::quickstart();
    let root = std::fs::canonicalize(project.path()).unwrap();
    let config = root.join("retrain.toml");
    let config = config.to_str().unwrap();
    let elsewhere = Project::new();
    let shown = retrain_ok(elsewhere.path(), &["--config", config, "config", "show"]).stdout;
    let r = root.display();
    for expected in [
        format!("state = \"sqlite://{r}/.retrain/state.db\""),
        format!("state_dir = \"{r}/.retrain\""),
        format!("database = \"sqlite://{r}/feedback.db\""),
        format!("metadata = \"file://{r}/datasets/dataset_metadata.json\""),
        format!("json = \"{r}/registry.json\""),
        format!("workdir = \"{r}\""),
    ] {
        assert!(shown.contains(&expected), "missing {expected}: {shown}");
    }
    // The JSON form parses and carries the same paths.
    let value = retrain_ok(
        elsewhere.path(),
        &["--config", config, "--output", "json", "config", "show"],
    )
    .json();
    assert_eq!(
        value["labels"]["department"]["trainer"]["workdir"],
        r.to_string()
    );
}
