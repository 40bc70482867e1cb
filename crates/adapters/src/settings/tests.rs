use super::*;

fn write(dir: &tempfile::TempDir, toml: &str) -> PathBuf {
    let path = dir.path().join("retrain.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn sources(file: Option<PathBuf>, env: &[(&str, &str)]) -> ConfigSources {
    ConfigSources {
        file,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        overrides: Vec::new(),
    }
}

const SEED_ENV: &[(&str, &str)] = &[
    ("HF_TOKEN", "hf_supersecret_token_123"),
    ("PREPARE_DATASET_REPO", "owner/project_prepare_dataset"),
    ("RETRAIN_DEPT_REPO", "owner/project_retrain_dept"),
    ("RETRAIN_URGENCY_REPO", "owner/project_retrain_urgency"),
    ("HF_HUB_METADATA_DEPT", "https://huggingface.co/datasets/owner/project_department/resolve/main/dataset_metadata.json"),
    ("HF_HUB_METADATA_URGENCY", "https://huggingface.co/datasets/owner/project_urgency/resolve/main/dataset_metadata.json"),
    ("DATABASE_URL", "postgresql+psycopg2://demo_user:demo_pass@db.example.com:5432/project_db"),
    ("THRESHOLD_DEPARTMENT", "40"),
    ("THRESHOLD_URGENCY", "30"),
    ("POLL_INTERVAL", "0.5"),
    ("POLL_TIMEOUT", "1800"),
    ("DRY_RUN", "true"),
    ("RETRAIN_COUNTS__QUERY", "SELECT label, misclassified, correct FROM counts WHERE reviewed_at > $1"),
];

#[test]
fn seed_env_alone_configures_both_labels() {
    let loaded = load(&sources(None, SEED_ENV)).unwrap();
    let s = &loaded.settings;
    assert!(s.dry_run);
    assert_eq!(s.poll.interval, Duration::from_millis(500));
    assert_eq!(s.poll.timeout, Duration::from_secs(1800));
    let dept = &s.labels[&Label::new("department").unwrap()];
    assert_eq!(dept.threshold, 40);
    assert!(dept.counts);
    assert_eq!(
        dept.trainer,
        JobSpec::HfSpace {
            repo: "owner/project_retrain_dept".into(),
            factory_reboot: false,
            wait_running: None
        }
    );
    assert_eq!(
        dept.prepare.as_ref().unwrap().key(),
        "hf-space://owner/project_prepare_dataset"
    );
    let urgency = &s.labels[&Label::new("urgency").unwrap()];
    assert_eq!(urgency.threshold, 30);
    assert!(urgency.metadata.contains("project_urgency"));
    assert!(s.counts.as_ref().unwrap().query.contains("$1"));
}

#[test]
fn retrain_repo_vars_are_never_config_keys() {
    assert!(!is_retrain_config_var("RETRAIN_DEPT_REPO"));
    assert!(!is_retrain_config_var("RETRAIN_LABEL"));
    assert!(!is_retrain_config_var("RETRAIN_RESULT"));
    assert!(!is_retrain_config_var("RETRAIN_CONFIG"));
    assert!(is_retrain_config_var("RETRAIN_STATE"));
    assert!(is_retrain_config_var("RETRAIN_DRY_RUN"));
    assert!(is_retrain_config_var("RETRAIN_COUNTS__QUERY"));
}

#[test]
fn precedence_file_then_seed_env_then_retrain_env_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        r#"
dry_run = false
max_parallel_labels = 4
[poll]
interval = "10s"
[labels.a]
threshold = 5
metadata = "file://meta.json"
trainer = "command:true"
"#,
    );
    let loaded = load(&sources(Some(file.clone()), &[("POLL_INTERVAL", "20")])).unwrap();
    assert_eq!(loaded.settings.poll.interval, Duration::from_secs(20));
    let loaded = load(&sources(
        Some(file.clone()),
        &[
            ("POLL_INTERVAL", "20"),
            ("RETRAIN_POLL__INTERVAL", "30s"),
            ("RETRAIN_MAX_PARALLEL_LABELS", "8"),
        ],
    ))
    .unwrap();
    assert_eq!(loaded.settings.poll.interval, Duration::from_secs(30));
    assert_eq!(loaded.settings.max_parallel_labels, 8);
    let mut with_flag = sources(Some(file), &[("DRY_RUN", "false")]);
    with_flag
        .overrides
        .push(("dry_run".into(), Value::Bool(true)));
    assert!(load(&with_flag).unwrap().settings.dry_run);
}

#[test]
fn lock_ttl_defaults_to_a_minute() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "[labels.a]\nthreshold = 3\nmetadata = \"file://m.json\"\ntrainer = \"command:true\"\n",
    );
    let loaded = load(&sources(Some(file.clone()), &[])).unwrap();
    assert_eq!(loaded.settings.lock_ttl, Duration::from_secs(60));
    let loaded = load(&sources(Some(file), &[("RETRAIN_LOCK_TTL", "5m")])).unwrap();
    assert_eq!(loaded.settings.lock_ttl, Duration::from_secs(300));
}

#[test]
fn errors_name_the_file_the_key_and_the_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        r#"
[labels.a]
threshold = "lots"
metadata = "file://meta.json"
trainer = "command:true"
"#,
    );
    let err = load(&sources(Some(file), &[])).unwrap_err().to_string();
    assert!(err.contains("retrain.toml"), "{err}");
    assert!(err.contains("labels.a.threshold"), "{err}");

    let file = write(
        &dir,
        "[labels.a]\nthreshold = 3\nmetadata = \"file://m.json\"\n",
    );
    let err = load(&sources(Some(file), &[])).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("labels.a.trainer"));
    assert!(err.to_string().contains("retrain.toml"), "{err}");

    let file = write(&dir, "bogus_key = 1\n");
    let err = load(&sources(Some(file), &[])).unwrap_err().to_string();
    assert!(err.contains("bogus_key"), "{err}");

    let err = load(&sources(None, &[("THRESHOLD_URGENCY", "many")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("THRESHOLD_URGENCY"), "{err}");
    assert!(err.contains("labels.urgency.threshold"), "{err}");

    let err = load(&sources(None, &[("RETRAIN_POLL__INTERVAL", "soon")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("RETRAIN_POLL__INTERVAL"), "{err}");
    assert!(err.contains("poll.interval"), "{err}");
}

#[test]
fn gate_and_registry_must_come_together() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[labels.seg]\nthreshold = 1\ncounts = \"none\"\nmetadata = \"s3://b/k.json\"\ntrainer = { command = [\"python\", \"train.py\"], timeout = \"2h\" }\n";
    let file = write(
        &dir,
        &format!("{base}gate = {{ metrics = [{{ name = \"dice\", direction = \"higher\" }}] }}\n"),
    );
    let err = load(&sources(Some(file), &[])).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("labels.seg.registry"));
    let file = write(
        &dir,
        &format!("{base}registry = {{ json = \"reg.json\", model = \"m\" }}\n"),
    );
    let err = load(&sources(Some(file), &[])).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("labels.seg.gate"));
    let file = write(&dir, &format!("{base}registry = {{ json = \"reg.json\", model = \"m\" }}\ngate = {{ metrics = [{{ name = \"dice\", direction = \"sideways\" }}] }}\n"));
    let err = load(&sources(Some(file), &[])).unwrap_err().to_string();
    assert!(err.contains("sideways"), "{err}");
}

#[test]
fn the_brief_example_parses() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        r#"
state = "sqlite://.retrain/state.db"
dry_run = false
max_parallel_labels = 16

[counts]
database = "postgres://u:p@localhost/db"
query = """SELECT label, misclassified, correct FROM feedback WHERE reviewed_at > $1"""
correct_ratio = 1.0

[hub]
endpoint = "https://huggingface.co"
token = "hf_abc"

[poll]
interval = "60s"
timeout = "30m"

[prepare]
space = "hf-space://owner/project_prepare_dataset"

[labels.department]
threshold = 40
metadata = "https://huggingface.co/datasets/owner/project_department/resolve/main/dataset_metadata.json"
trainer = "hf-space://owner/project_retrain_dept"
gate = "none"

[labels.segmentation]
threshold = 100
counts = "none"
prepare = "none"
metadata = "s3://bucket/wms/dataset_metadata.json"
trainer = { command = ["python", "train.py"], timeout = "2h" }
lease = { ec2 = ["i-0abc"], region = "eu-west-1", health_url = "http://{public_ip}:5000/health", max = "3h" }
registry = { mlflow = "http://{public_ip}:5000", model = "wms-unet", alias = "production" }
gate = { require = "all", metrics = [ { name = "dice", direction = "higher" }, { name = "iou", direction = "higher" } ] }
notify = [ { github = "owner/repo", on = "improved", pr_head = "data-update" } ]
"#,
    );
    let s = load(&sources(Some(file), &[])).unwrap().settings;
    let seg = &s.labels[&Label::new("segmentation").unwrap()];
    assert!(!seg.counts);
    assert!(seg.prepare.is_none());
    assert_eq!(seg.train_timeout, Duration::from_secs(7200));
    assert_eq!(
        seg.lease.as_ref().unwrap().max,
        Duration::from_secs(3 * 3600)
    );
    assert_eq!(seg.gate.as_ref().unwrap().metrics().len(), 2);
    let dept = &s.labels[&Label::new("department").unwrap()];
    assert!(dept.gate.is_none());
    assert!(dept.prepare.is_some());
}

#[test]
fn redacted_view_never_shows_secrets() {
    let loaded = load(&sources(None, SEED_ENV)).unwrap();
    let shown = redacted_toml(&loaded.figment).unwrap();
    assert!(!shown.contains("hf_supersecret_token_123"), "{shown}");
    assert!(!shown.contains("demo_pass"), "{shown}");
    assert!(shown.contains("***"), "{shown}");
    let debug = format!("{:?}", loaded.settings);
    assert!(!debug.contains("hf_supersecret_token_123"), "{debug}");
    assert!(!debug.contains("demo_pass"), "{debug}");
}

#[test]
fn job_specs() {
    assert_eq!(
        parse_job(&Value::String("none".into()), false).unwrap(),
        None
    );
    assert_eq!(
        parse_space_repo("https://huggingface.co/spaces/o/n").unwrap(),
        "o/n"
    );
    assert!(parse_space_repo("not a space").is_err());
    assert!(parse_job(&serde_json::json!({"command": []}), true).is_err());
    assert!(
        parse_job(&serde_json::json!({"command": ["x"], "bogus": 1}), true)
            .unwrap_err()
            .contains("bogus")
    );
}

#[test]
fn github_notify_specs_for_pull_requests() {
    match parse_notify(&serde_json::json!({"github": "o/r", "pr": "triggering", "approve": true, "auto_merge": true, "pr_file": "model-metadata.json"})).unwrap() {
        NotifySpec::Github { pr_triggering, approve, auto_merge, pr_file, on, issue, pr_head, .. } => {
            assert!(pr_triggering && approve && auto_merge);
            assert_eq!(pr_file.as_deref(), Some("model-metadata.json"));
            assert_eq!(on, NotifyOn::Always, "a reject is explained on the triggering PR");
            assert!(issue.is_none() && pr_head.is_none());
        }
        other => panic!("{other:?}"),
    }
    match parse_notify(&serde_json::json!({"github": "o/r", "pr_head": "retrain/seg", "auto_merge": true, "app_login": "github-actions[bot]"})).unwrap() {
        NotifySpec::Github { pr_head, pr_base, pr_file, on, app_login, .. } => {
            assert_eq!(pr_head.as_deref(), Some("retrain/seg"));
            assert_eq!(pr_base, "main");
            assert_eq!(pr_file, None);
            assert_eq!(on, NotifyOn::Improved);
            assert_eq!(app_login.as_deref(), Some("github-actions[bot]"));
        }
        other => panic!("{other:?}"),
    }
    for (bad, expected) in [
        (
            serde_json::json!({"github": "o/r", "pr": "current"}),
            "triggering",
        ),
        (
            serde_json::json!({"github": "o/r", "pr": "triggering", "issue": 3}),
            "only one",
        ),
        (
            serde_json::json!({"github": "o/r", "pr_head": "x", "approve": true}),
            "`approve`",
        ),
        (
            serde_json::json!({"github": "o/r", "issue": 3, "pr_file": "m.json"}),
            "`pr_file`",
        ),
        (
            serde_json::json!({"github": "o/r", "pr": "triggering", "pr_file": "../m.json"}),
            "..",
        ),
        (
            serde_json::json!({"github": "o/r", "pr": "triggering", "approve": "yes"}),
            "true or false",
        ),
        (
            serde_json::json!({"github": "o/r", "pr": "triggering", "pr_base": "main"}),
            "`pr_base`",
        ),
        (serde_json::json!({"github": "o/r"}), "pr = \"triggering\""),
    ] {
        let err = parse_notify(&bad).unwrap_err();
        assert!(err.contains(expected), "{bad}: {err}");
    }
}

#[test]
fn approval_expires_and_dataset_check_parse_with_defaults_and_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[labels.seg]\nthreshold = 1\ncounts = \"none\"\nmetadata = \"file://m.json\"\ntrainer = \"command:true\"\n";
    let file = write(&dir, base);
    let loaded = load(&sources(Some(file), &[])).unwrap();
    let seg = &loaded.settings.labels[&Label::new("seg").unwrap()];
    assert_eq!(seg.approval_expires, Duration::from_secs(7 * 86_400));
    assert!(seg.dataset_check.is_none());

    let file = write(
        &dir,
        &format!("{base}approval_expires = \"36h\"\ndataset_check = {{ command = [\"python\", \"check.py\"], timeout = \"5m\", env = {{ STRICT = \"1\" }} }}\n"),
    );
    let loaded = load(&sources(Some(file), &[])).unwrap();
    let seg = &loaded.settings.labels[&Label::new("seg").unwrap()];
    assert_eq!(seg.approval_expires, Duration::from_secs(36 * 3600));
    let check = seg.dataset_check.as_ref().unwrap();
    assert_eq!(check.argv, vec!["python", "check.py"]);
    assert_eq!(check.timeout, Some(Duration::from_secs(300)));
    assert_eq!(check.env["STRICT"], "1");
    // Run next to the config file, like the trainer.
    assert_eq!(check.workdir.as_deref(), Some(dir.path()));

    // Without a timeout: the default.
    let file = write(
        &dir,
        &format!("{base}dataset_check = \"command:./check.sh\"\n"),
    );
    let loaded = load(&sources(Some(file), &[])).unwrap();
    let check = loaded.settings.labels[&Label::new("seg").unwrap()]
        .dataset_check
        .clone()
        .unwrap();
    assert_eq!(check.timeout, Some(DEFAULT_DATASET_CHECK_TIMEOUT));
    assert_eq!(
        check.argv[0],
        dir.path().join("check.sh").display().to_string()
    );

    for (line, key, says) in [
        (
            "approval_expires = \"soon\"",
            "labels.seg.approval_expires",
            "soon",
        ),
        (
            "approval_expires = \"0s\"",
            "labels.seg.approval_expires",
            "> 0",
        ),
        (
            "dataset_check = \"owner/space\"",
            "labels.seg.dataset_check",
            "runs locally",
        ),
        ("dataset_check = 3", "labels.seg.dataset_check", "command"),
        (
            "dataset_check = { timeout = \"5m\" }",
            "labels.seg.dataset_check",
            "missing `command`",
        ),
        (
            "dataset_check = { command = [] }",
            "labels.seg.dataset_check",
            "must not be empty",
        ),
        (
            "dataset_check = { command = [\"x\"], timeout = \"0s\" }",
            "labels.seg.dataset_check",
            "greater than zero",
        ),
        (
            "dataset_check = { command = [\"x\"], retries = 2 }",
            "labels.seg.dataset_check",
            "retries",
        ),
    ] {
        let file = write(&dir, &format!("{base}{line}\n"));
        let err = load(&sources(Some(file), &[])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(key), "{line}: {text}");
        assert!(text.contains(says), "{line}: {text}");
    }
}

#[test]
fn github_workflow_trainers_parse_and_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        r#"
[labels.seg]
threshold = 3
metadata = "file://m.json"
trainer = { github_workflow = { repo = "acme/ml", workflow = "train.yml", ref = "release", inputs = { epochs = 20, fast = true }, timeout = "3h" } }
"#,
    );
    let loaded = load(&sources(Some(file), &[])).unwrap();
    let seg = &loaded.settings.labels[&Label::new("seg").unwrap()];
    let JobSpec::GithubWorkflow(config) = &seg.trainer else {
        panic!("{:?}", seg.trainer)
    };
    assert_eq!(config.repo, "acme/ml");
    assert_eq!(config.workflow, "train.yml");
    assert_eq!(config.git_ref, "release");
    assert_eq!(config.inputs["epochs"], "20");
    assert_eq!(config.inputs["fast"], "true");
    // The workflow's timeout is the label's train_timeout.
    assert_eq!(seg.train_timeout, Duration::from_secs(3 * 3600));

    // `ref` defaults to main.
    let minimal = serde_json::json!({"github_workflow": {"repo": "a/b", "workflow": "12345"}});
    let Some(JobSpec::GithubWorkflow(config)) = parse_job(&minimal, true).unwrap() else {
        panic!()
    };
    assert_eq!(config.git_ref, "main");

    for (trainer, named) in [
        (
            r#"{ github_workflow = { repo = "acme", workflow = "train.yml" } }"#,
            "`repo`",
        ),
        (
            r#"{ github_workflow = { repo = "acme/ml", workflow = ".github/workflows/train.yml" } }"#,
            "`workflow`",
        ),
        (
            r#"{ github_workflow = { repo = "acme/ml" } }"#,
            "missing `workflow`",
        ),
        (
            r#"{ github_workflow = { repo = "acme/ml", workflow = "t.yml", inputs = { label = "x" } } }"#,
            "inputs.label",
        ),
        (
            r#"{ github_workflow = { repo = "acme/ml", workflow = "t.yml", bogus = 1 } }"#,
            "bogus",
        ),
        (
            r#"{ github_workflow = { repo = "acme/ml", workflow = "t.yml", timeout = "soon" } }"#,
            "`timeout`",
        ),
    ] {
        let file = write(
            &dir,
            &format!(
                "[labels.seg]\nthreshold = 3\nmetadata = \"file://m.json\"\ntrainer = {trainer}\n"
            ),
        );
        let err = load(&sources(Some(file), &[])).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("labels.seg.trainer"), "{err}");
        let text = err.to_string();
        assert!(text.contains(named), "{trainer}: {text}");
        assert!(text.contains("retrain.toml"), "{text}");
    }
    // Trainers only.
    let err = parse_job(&minimal, false).unwrap_err();
    assert!(err.contains("trainers only"), "{err}");
}
