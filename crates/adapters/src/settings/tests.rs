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
fn poll_scout_max_gap_defaults_to_five_minutes_and_zero_turns_it_off() {
    let dir = tempfile::tempdir().unwrap();
    let label = r#"
[labels.a]
threshold = 5
metadata = "file://meta.json"
trainer = "command:true"
"#;
    let file = write(&dir, label);
    let loaded = load(&sources(Some(file), &[])).unwrap();
    assert_eq!(loaded.settings.poll.scout_max_gap, Duration::from_secs(300));
    let file = write(&dir, &format!("[poll]\nscout_max_gap = \"0s\"\n{label}"));
    let loaded = load(&sources(Some(file.clone()), &[])).unwrap();
    assert_eq!(loaded.settings.poll.scout_max_gap, Duration::ZERO);
    let loaded = load(&sources(
        Some(file),
        &[("RETRAIN_POLL__SCOUT_MAX_GAP", "2m")],
    ))
    .unwrap();
    assert_eq!(loaded.settings.poll.scout_max_gap, Duration::from_secs(120));
    let file = write(&dir, &format!("[poll]\nscout_max_gap = \"soon\"\n{label}"));
    let err = load(&sources(Some(file), &[])).unwrap_err().to_string();
    assert!(err.contains("scout_max_gap"), "{err}");
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
    let shown = redacted_toml(&loaded.effective()).unwrap();
    assert!(!shown.contains("hf_supersecret_token_123"), "{shown}");
    assert!(!shown.contains("demo_pass"), "{shown}");
    assert!(shown.contains("***"), "{shown}");
    // The settings' Debug, and the loaded configuration's (whose layers
    // hold every value as written).
    for debug in [format!("{:?}", loaded.settings), format!("{loaded:?}")] {
        assert!(!debug.contains("hf_supersecret_token_123"), "{debug}");
        assert!(!debug.contains("demo_pass"), "{debug}");
    }
}

#[test]
fn one_merge_serves_extraction_and_resolution_alike() {
    // The values come from the merged tree and not from `extract`: every
    // layer must still count, and errors still name their provider.
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "state = \"sqlite://s.db\"\n[labels.seg]\nthreshold = 7\ncounts = \"none\"\nmetadata = \"m.json\"\ntrainer = { command = [\"./train.sh\"], timeout = \"1h\" }\n",
    );
    let env = [("RETRAIN_LABELS__SEG__THRESHOLD", "9")];
    let loaded = load(&sources(Some(file.clone()), &env)).unwrap();
    let seg = &loaded.settings.labels[&Label::new("seg").unwrap()];
    assert_eq!(seg.threshold, 9);
    let dir_path = std::fs::canonicalize(dir.path()).unwrap();
    assert_eq!(seg.metadata, dir_path.join("m.json").display().to_string());
    let shown = redacted_toml(&loaded.effective()).unwrap();
    assert!(
        shown.contains(&dir_path.join("train.sh").display().to_string()),
        "{shown}"
    );
    let err = load(&sources(
        Some(file),
        &[("RETRAIN_LABELS__SEG__THRESHOLD", "many")],
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("RETRAIN_LABELS__SEG__THRESHOLD"), "{err}");
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
fn github_triggers_are_validated_and_named_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let base =
        "[labels.a]\nthreshold = 3\nmetadata = \"file://m.json\"\ntrainer = \"command:true\"\n";
    let file = write(
        &dir,
        &format!("{base}github_trigger = {{ repo = \"org/data\", branch = \"main\", paths = [\"data/\"] }}\n"),
    );
    let loaded = load(&sources(Some(file), &[])).unwrap();
    let trigger = loaded.settings.labels[&Label::new("a").unwrap()]
        .github_trigger
        .clone()
        .unwrap();
    assert_eq!(trigger.repo, "org/data");
    assert_eq!(trigger.branch, "main");
    assert_eq!(trigger.paths, vec!["data/"]);

    for (bad, expected) in [
        ("\"all\"", "expected \"none\" or { repo, branch, paths? }"),
        ("{ repo = \"org\", branch = \"main\" }", "is not owner/name"),
        (
            "{ repo = \"org/data\", branch = \"a b\" }",
            "is not a git branch name",
        ),
        ("{ repo = \"org/data\" }", "branch"),
        (
            "{ repo = \"org/data\", branch = \"main\", path = [] }",
            "path",
        ),
    ] {
        let file = write(&dir, &format!("{base}github_trigger = {bad}\n"));
        let e = load(&sources(Some(file), &[])).unwrap_err();
        assert!(
            e.to_string().contains("labels.a.github_trigger") && e.to_string().contains(expected),
            "{bad}: {e}"
        );
    }
}

const SERVER_TOKEN: &str = "0123456789abcdef0123";

#[test]
fn server_defaults_and_seed_003_names() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "");
    let loaded = load(&sources(Some(file.clone()), &[])).unwrap();
    let server = &loaded.settings.server;
    assert_eq!(server.bind, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(server.body_limit, 1024 * 1024);
    assert_eq!(server.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(server.worker_ttl, Duration::from_secs(60));
    assert_eq!(server.heartbeat_interval, Duration::from_secs(10));
    assert!(server.tokens.is_empty());
    assert!(server.schedule.is_none());
    assert_eq!(
        server.artifacts_dir,
        loaded.settings.state_dir.join("artifacts")
    );

    let env = [
        ("PORT", "9999"),
        ("LOG_FILE", "logs/server.log"),
        ("LOG_MAX_BYTES", "2048"),
        ("LOG_BACKUP_COUNT", "3"),
        ("LOG_LEVEL", "debug"),
        ("ORCHESTRATOR_TOKEN", "seed-003-token-0000"),
        ("RETRAIN_SERVER_TOKEN", SERVER_TOKEN),
        ("RETRAIN_SERVER__WEBHOOKS__GITHUB_SECRET", "gh-secret"),
    ];
    let loaded = load(&sources(Some(file), &env)).unwrap();
    let server = &loaded.settings.server;
    assert_eq!(server.bind.port(), 9999);
    assert_eq!(server.log.max_bytes, 2048);
    assert_eq!(server.log.backup_count, 3);
    assert_eq!(server.log.level, "debug");
    let log_file = server.log.file.as_ref().unwrap();
    assert!(log_file.is_absolute() && log_file.ends_with("logs/server.log"));
    // RETRAIN_SERVER_TOKEN wins over the seed's name; all scopes.
    assert_eq!(server.tokens.len(), 1);
    assert_eq!(server.tokens[0].name, SIMPLE_TOKEN_NAME);
    assert_eq!(server.tokens[0].secret.expose_secret(), SERVER_TOKEN);
    assert!(Scope::ALL.iter().all(|s| server.tokens[0].allows(*s)));
    assert_eq!(
        server
            .webhooks
            .github_secret
            .as_ref()
            .unwrap()
            .expose_secret(),
        "gh-secret"
    );
    assert!(server.webhooks.huggingface_secret.is_none());
    // Secrets never show in Debug or `config show`.
    let debug = format!("{server:?}");
    assert!(
        !debug.contains(SERVER_TOKEN) && !debug.contains("gh-secret"),
        "{debug}"
    );
    let shown = redacted_toml(&loaded.effective()).unwrap();
    assert!(
        !shown.contains(SERVER_TOKEN) && !shown.contains("gh-secret"),
        "{shown}"
    );
}

#[test]
fn named_server_tokens_read_their_env_and_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        r#"
[server]
bind = "0.0.0.0:8081"
[[server.tokens]]
name = "ci"
env = "CI_TOKEN"
scopes = ["read", "trigger"]
[[server.tokens]]
name = "ml-lead"
env = "LEAD_TOKEN"
scopes = ["read", "approve", "rollback"]
[server.schedule]
cron = "0 3 * * *"
timezone = "Europe/Paris"
jitter = "5m"
"#,
    );
    let env = [
        ("CI_TOKEN", "ci-token-0123456789"),
        ("LEAD_TOKEN", "lead-token-0123456789"),
    ];
    let server = load(&sources(Some(file), &env)).unwrap().settings.server;
    assert_eq!(server.bind, "0.0.0.0:8081".parse().unwrap());
    let ci = &server.tokens[0];
    assert_eq!(ci.name, "ci");
    assert!(ci.allows(Scope::Trigger) && !ci.allows(Scope::Approve));
    assert!(server.tokens[1].allows(Scope::Approve));
    assert_eq!(
        server.schedule,
        Some(ScheduleSettings {
            cron: "0 3 * * *".into(),
            timezone: "Europe/Paris".into(),
            jitter: Duration::from_secs(300),
        })
    );
}

#[test]
fn bad_server_settings_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    /// (config file, env, the key the error must name)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("[server]\nbind = \"localhost\"\n", &[], "server.bind"),
        ("[server]\nbody_limit = 10\n", &[], "server.body_limit"),
        (
            "[server]\nheartbeat_interval = \"500ms\"\n",
            &[],
            "server.heartbeat_interval",
        ),
        ("[server]\nworker_ttl = \"15s\"\n", &[], "server.worker_ttl"),
        ("[server]\nworker_ttl = \"soon\"\n", &[], "worker_ttl"),
        (
            "[server]\nshutdown_timeout = \"0s\"\n",
            &[],
            "server.shutdown_timeout",
        ),
        ("[server]\nbnid = \"x\"\n", &[], "bnid"),
        (
            "[[server.tokens]]\nname = \"ci\"\nenv = \"MISSING_TOKEN\"\nscopes = [\"read\"]\n",
            &[],
            "server.tokens[0].env",
        ),
        (
            "[[server.tokens]]\nname = \"ci\"\nenv = \"CI_TOKEN\"\nscopes = [\"reed\"]\n",
            &[("CI_TOKEN", "ci-token-0123456789")],
            "server.tokens[0].scopes",
        ),
        (
            "[[server.tokens]]\nname = \"ci\"\nenv = \"CI_TOKEN\"\nscopes = [\"read\"]\n",
            &[("CI_TOKEN", "short")],
            "server.tokens[0].env",
        ),
        ("", &[("PORT", "eighty")], "server.port"),
        ("", &[("RETRAIN_SERVER_TOKEN", "short")], "server.token"),
    ];
    for (toml, env, key) in cases {
        let file = write(&dir, toml);
        let error = load(&sources(Some(file), env)).unwrap_err();
        assert!(
            error.message.contains(key),
            "{toml} {env:?}: expected the key {key} in {}",
            error.message
        );
        assert!(!error.message.contains("short"), "{}", error.message);
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

#[test]
fn counts_watermarks_form_defaults_to_shared_and_errors_name_the_key() {
    use crate::counts::WatermarkForm;
    let dir = tempfile::tempdir().unwrap();
    let base = "[counts]\ndatabase = \"sqlite://f.db\"\nquery = \"SELECT 1\"\n";
    let form = |extra: &str| {
        let file = write(&dir, &format!("{base}{extra}"));
        load(&sources(Some(file), &[])).map(|l| l.settings.counts.unwrap().watermarks)
    };
    assert_eq!(form("").unwrap(), WatermarkForm::Shared);
    assert_eq!(
        form("watermarks = \"per_label\"\n").unwrap(),
        WatermarkForm::PerLabel
    );
    assert_eq!(
        form("watermarks = \"shared\"\n").unwrap(),
        WatermarkForm::Shared
    );
    let err = form("watermarks = \"each\"\n").unwrap_err().to_string();
    assert!(err.contains("watermarks"), "{err}");
    assert!(err.contains("each"), "{err}");
}

#[test]
fn worker_trainers_parse_and_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        r#"
[labels.seg]
threshold = 3
metadata = "file://m.json"
trainer = { worker = { gpu = 1, gpu_memory = "24G", memory = "32GiB", cpus = 4, tags = ["a100"], command = ["python", "train.py"], env = { EPOCHS = 20, API_KEY = "sk-secret-value" }, timeout = "4h", queue_timeout = "10m" } }
"#,
    );
    let loaded = load(&sources(Some(file), &[])).unwrap();
    let seg = &loaded.settings.labels[&Label::new("seg").unwrap()];
    let JobSpec::Worker(config) = &seg.trainer else {
        panic!("{:?}", seg.trainer)
    };
    assert_eq!(config.request.gpus, Some(1));
    assert_eq!(config.request.gpu_memory_bytes, Some(24 << 30));
    assert_eq!(config.request.memory_bytes, Some(32 << 30));
    assert_eq!(config.request.cpus, Some(4));
    assert_eq!(config.request.tags, vec!["a100".to_owned()]);
    assert_eq!(
        config.command,
        vec!["python".to_owned(), "train.py".to_owned()]
    );
    assert_eq!(config.env["EPOCHS"], "20");
    assert_eq!(config.timeout, Duration::from_secs(4 * 3600));
    assert_eq!(config.queue_timeout, Duration::from_secs(600));
    // The engine's wait covers the queue and the job.
    assert_eq!(seg.train_timeout, Duration::from_secs(4 * 3600 + 600));
    assert!(!format!("{config:?}").contains("sk-secret-value"));
    assert_eq!(
        config.request.describe(),
        "gpu≥1, gpu_memory≥24G, memory≥32G, cpus≥4, tags ⊇ [a100]"
    );

    // Defaults: 2 h on the worker, 10 min in the queue, any worker.
    let minimal = serde_json::json!({"worker": {"command": "python train.py"}});
    let Some(JobSpec::Worker(config)) = parse_job(&minimal, true).unwrap() else {
        panic!()
    };
    assert_eq!(config.timeout, Duration::from_secs(7200));
    assert_eq!(config.queue_timeout, Duration::from_secs(600));
    assert_eq!(config.request.describe(), "any worker");
    assert_eq!(crate::settings::parse_size("512M").unwrap(), 512 << 20);
    assert_eq!(crate::settings::parse_size("1.5K").unwrap(), 1536);
    assert_eq!(crate::settings::parse_size("1000").unwrap(), 1000);

    for (trainer, named) in [
        (r#"{ worker = { gpu = 1 } }"#, "missing `command`"),
        (r#"{ worker = { command = [] } }"#, "`command`"),
        (r#"{ worker = { command = ["t"], gpu = -1 } }"#, "`gpu`"),
        (r#"{ worker = { command = ["t"], gpu = "one" } }"#, "`gpu`"),
        (
            r#"{ worker = { command = ["t"], gpu_memory = "24X" } }"#,
            "`gpu_memory`",
        ),
        (
            r#"{ worker = { command = ["t"], memory = true } }"#,
            "`memory`",
        ),
        (
            r#"{ worker = { command = ["t"], tags = ["a,b"] } }"#,
            "`tags`",
        ),
        (
            r#"{ worker = { command = ["t"], queue_timeout = "0s" } }"#,
            "`queue_timeout`",
        ),
        (
            r#"{ worker = { command = ["t"], timeout = "soon" } }"#,
            "`timeout`",
        ),
        (r#"{ worker = { command = ["t"], gpus = 1 } }"#, "gpus"),
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
        assert!(text.contains("worker"), "{text}");
    }
    // Trainers only.
    let err = parse_job(&minimal, false).unwrap_err();
    assert!(err.contains("trainers only"), "{err}");
}

#[test]
fn resolved_paths_nest_by_their_dotted_keys() {
    let nested = nest(vec![
        ("state_dir".into(), serde_json::json!("/p/.retrain")),
        ("labels.a.metadata".into(), serde_json::json!("/p/a.json")),
        (
            "labels.a.trainer".into(),
            serde_json::json!({"command": ["x"], "workdir": "/p"}),
        ),
        (
            "labels.b.registry.json".into(),
            serde_json::json!("/p/r.json"),
        ),
    ]);
    assert_eq!(
        nested,
        serde_json::json!({
            "state_dir": "/p/.retrain",
            "labels": {
                "a": {"metadata": "/p/a.json", "trainer": {"command": ["x"], "workdir": "/p"}},
                "b": {"registry": {"json": "/p/r.json"}},
            },
        })
    );
}

/// Many labels load in one pass: each label's paths are resolved against a
/// configuration merged once, and merged back in one step (both were once
/// per path, quadratic in the labels: 10,000 labels took minutes). The
/// timing is in docs/BENCHMARKS.md; this checks the result at a size where
/// the quadratic form would still finish.
#[test]
fn two_thousand_labels_resolve_each_their_own_paths() {
    let dir = tempfile::tempdir().unwrap();
    let mut toml = String::from("state = \"sqlite://state.db\"\n");
    for n in 0..2000 {
        toml.push_str(&format!(
            "[labels.l{n}]\nthreshold = 1\ncounts = \"none\"\nmetadata = \"file://m{n}.json\"\n\
             trainer = {{ command = [\"./train{n}.sh\"] }}\n"
        ));
    }
    let loaded = load(&sources(Some(write(&dir, &toml)), &[])).unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let label = |n: usize| &loaded.settings.labels[&Label::new(format!("l{n}")).unwrap()];
    for n in [0, 999, 1999] {
        assert_eq!(
            label(n).metadata,
            format!("file://{}", base.join(format!("m{n}.json")).display())
        );
        let JobSpec::Command(trainer) = &label(n).trainer else {
            panic!("a command trainer");
        };
        assert_eq!(
            trainer.argv[0],
            base.join(format!("train{n}.sh")).display().to_string()
        );
    }
    let shown: toml::Value = toml::from_str(&redacted_toml(&loaded.effective()).unwrap()).unwrap();
    assert_eq!(
        shown["labels"]["l1999"]["metadata"].as_str(),
        Some(format!("file://{}", base.join("m1999.json").display()).as_str())
    );
}

/// The error of loading `toml` as the config file in `dir`.
fn load_error(dir: &tempfile::TempDir, toml: &str) -> ConfigError {
    load(&sources(Some(write(dir, toml)), &[])).unwrap_err()
}

#[test]
fn label_defaults_fill_every_label_key_by_key_and_a_labels_own_key_wins_whole() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        r#"
[label_defaults]
threshold = 50
counts = "none"
metadata = "file://shared/meta.json"
trainer = { command = ["./train.sh"], timeout = "5m" }
registry = { json = "registry.json", model = "m" }
gate = { metrics = [{ name = "f1", direction = "higher" }] }
promote = "manual"
prepare = { command = ["./prepare.sh"] }

[labels.plain]

[labels.own]
threshold = 7
trainer = { worker = { command = ["python", "train.py"] } }
gate = "none"
registry = { json = "other.json", model = "m2" }
"#,
    );
    let loaded = load(&sources(Some(file), &[])).unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let label = |n: &str| &loaded.settings.labels[&Label::new(n).unwrap()];

    let plain = label("plain");
    assert_eq!(plain.threshold, 50);
    assert!(!plain.counts);
    assert_eq!(plain.promote, PromoteMode::Manual);
    assert!(plain.gate.is_some());
    // Relative paths of a default resolve against the file that set it.
    assert_eq!(
        plain.metadata,
        format!("file://{}", base.join("shared/meta.json").display())
    );
    let JobSpec::Command(trainer) = &plain.trainer else {
        panic!("the default command trainer, got {:?}", plain.trainer);
    };
    assert_eq!(trainer.argv[0], base.join("train.sh").display().to_string());
    assert_eq!(trainer.timeout, Some(Duration::from_secs(300)));

    // A label's own key replaces the default whole: no merged trainer table.
    let own = label("own");
    assert_eq!(own.threshold, 7);
    assert!(
        matches!(own.trainer, JobSpec::Worker(_)),
        "{:?}",
        own.trainer
    );
    assert!(own.gate.is_none());
    assert_eq!(
        own.promote,
        PromoteMode::Manual,
        "keys it does not set come from the defaults"
    );
    let Some(RegistrySpec::Json { path, .. }) = &own.registry else {
        panic!("a json registry, got {:?}", own.registry);
    };
    assert_eq!(path, &base.join("other.json"));

    // `config show`: a default's resolved paths once, at the default's key;
    // a label's own keys at the label.
    let shown: toml::Value = toml::from_str(&redacted_toml(&loaded.effective()).unwrap()).unwrap();
    let train_sh = base.join("train.sh").display().to_string();
    assert_eq!(
        shown["label_defaults"]["trainer"]["command"][0].as_str(),
        Some(train_sh.as_str()),
        "{shown}"
    );
    assert_eq!(
        shown["label_defaults"]["registry"]["json"].as_str(),
        Some(base.join("registry.json").display().to_string().as_str())
    );
    assert!(shown["labels"]["plain"].get("trainer").is_none(), "{shown}");
    assert_eq!(
        shown["label_defaults"]["prepare"]["command"][0].as_str(),
        Some(base.join("prepare.sh").display().to_string().as_str()),
        "{shown}"
    );
    assert!(shown["labels"]["own"].get("prepare").is_none(), "{shown}");
    assert!(shown.get("prepare").is_none(), "{shown}");
    assert!(
        shown["labels"]["plain"].get("metadata").is_none(),
        "{shown}"
    );
    assert_eq!(
        shown["labels"]["own"]["registry"]["json"].as_str(),
        Some(base.join("other.json").display().to_string().as_str())
    );
}

#[test]
fn label_defaults_errors_name_the_default_and_env_vars_set_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let label = "[labels.a]\nmetadata = \"file://m.json\"\n";

    // A value of the wrong type: named once, as the default.
    let err = load_error(
        &dir,
        &format!("[label_defaults]\nthreshold = \"lots\"\ntrainer = \"command:true\"\n{label}"),
    );
    assert_eq!(
        err.key.as_deref(),
        Some("label_defaults.threshold"),
        "{err}"
    );
    assert!(err.to_string().contains("retrain.toml"), "{err}");

    // A key that no label has.
    let file = write(&dir, &format!("[label_defaults]\nthresold = 3\n{label}"));
    let err = load(&sources(Some(file), &[])).unwrap_err().to_string();
    assert!(err.contains("thresold"), "{err}");

    // Not a table.
    let err = load_error(&dir, &format!("label_defaults = 3\n{label}"));
    assert_eq!(err.key.as_deref(), Some("label_defaults"), "{err}");

    // A default that a label's own rules refuse names the default...
    let err = load_error(
        &dir,
        &format!("[label_defaults]\nthreshold = 1\ntrainer = \"none\"\n{label}"),
    );
    assert_eq!(err.key.as_deref(), Some("label_defaults.trainer"), "{err}");
    let err = load_error(
        &dir,
        &format!(
            "[label_defaults]\nthreshold = 1\ntrainer = \"command:true\"\nnotify = [\"log\", {{ slack = \"not a url\" }}]\n{label}"
        ),
    );
    assert_eq!(
        err.key.as_deref(),
        Some("label_defaults.notify[1]"),
        "{err}"
    );
    // ...and a key the label is missing names the label.
    let err = load_error(&dir, &format!("[label_defaults]\nthreshold = 1\n{label}"));
    assert_eq!(err.key.as_deref(), Some("labels.a.trainer"), "{err}");

    // An environment variable sets a default; an error in it names it.
    let file = write(
        &dir,
        &format!("[label_defaults]\ntrainer = \"command:true\"\n{label}"),
    );
    let loaded = load(&sources(
        Some(file.clone()),
        &[("RETRAIN_LABEL_DEFAULTS__THRESHOLD", "12")],
    ))
    .unwrap();
    assert_eq!(
        loaded.settings.labels[&Label::new("a").unwrap()].threshold,
        12
    );
    let err = load(&sources(
        Some(file),
        &[("RETRAIN_LABEL_DEFAULTS__THRESHOLD", "twelve")],
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("RETRAIN_LABEL_DEFAULTS__THRESHOLD"), "{err}");
}

#[test]
fn label_in_a_default_is_each_labels_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        r#"
[label_defaults]
threshold = 1
metadata = "hf://datasets/acme/{label}/dataset_metadata.json"
trainer = { command = ["./train.sh", "--task", "{label}"], workdir = "work/{label}" }
registry = { json = "registry.json", model = "tickets-{label}" }
gate = "none"

[labels.department]
[labels.urgency]
metadata = "file://own.json"
"#,
    );
    let loaded = load(&sources(Some(file), &[])).unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let label = |n: &str| &loaded.settings.labels[&Label::new(n).unwrap()];
    let department = label("department");
    assert_eq!(
        department.metadata,
        "hf://datasets/acme/department/dataset_metadata.json"
    );
    let JobSpec::Command(trainer) = &department.trainer else {
        panic!("{:?}", department.trainer);
    };
    assert_eq!(trainer.argv[1..], ["--task", "department"]);
    assert_eq!(
        trainer.workdir.as_deref(),
        Some(base.join("work/department").as_path())
    );
    let Some(RegistrySpec::Json { model, path }) = &department.registry else {
        panic!("{:?}", department.registry);
    };
    assert_eq!(model, "tickets-department");
    assert_eq!(path, &base.join("registry.json"));
    let urgency = label("urgency");
    assert!(
        urgency.metadata.ends_with("/own.json"),
        "{}",
        urgency.metadata
    );
    let JobSpec::Command(trainer) = &urgency.trainer else {
        panic!("{:?}", urgency.trainer);
    };
    assert_eq!(trainer.argv[2], "urgency");

    // `config show`: the default as written, and each label's resolved
    // paths of a templated default.
    let shown: toml::Value = toml::from_str(&redacted_toml(&loaded.effective()).unwrap()).unwrap();
    assert_eq!(
        shown["labels"]["department"]["trainer"]["workdir"].as_str(),
        Some(base.join("work/department").display().to_string().as_str()),
        "{shown}"
    );
    assert_eq!(
        shown["label_defaults"]["trainer"]["command"][2].as_str(),
        Some("{label}"),
        "the default as written: {shown}"
    );
    assert_eq!(
        shown["labels"]["department"]["registry"]["json"].as_str(),
        Some(base.join("registry.json").display().to_string().as_str()),
        "a templated default's resolved paths are each label's: {shown}"
    );

    // An error in a templated default names the default.
    let err = load_error(
        &dir,
        "[label_defaults]
threshold = 1
trainer = \"command:true\"
metadata = \"ftp://{label}\"
[labels.a]
",
    );
    assert_eq!(err.key.as_deref(), Some("label_defaults.metadata"), "{err}");
}

#[test]
fn a_label_opts_out_of_a_default_registry_lease_gate_notify_or_trigger_with_none() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        r#"
[label_defaults]
threshold = 1
metadata = "file://m.json"
trainer = "command:true"
registry = { json = "registry.json", model = "m" }
gate = { metrics = [{ name = "f1", direction = "higher" }] }
lease = { ec2 = ["i-0123456789abcdef0"], region = "eu-west-1" }
notify = ["log"]
github_trigger = { repo = "org/data", branch = "main" }

[labels.shared]

[labels.alone]
registry = "none"
gate = "none"
lease = "none"
notify = []
github_trigger = "none"
"#,
    );
    let loaded = load(&sources(Some(file), &[])).unwrap();
    let label = |n: &str| &loaded.settings.labels[&Label::new(n).unwrap()];
    let shared = label("shared");
    assert!(shared.registry.is_some() && shared.gate.is_some() && shared.lease.is_some());
    assert_eq!(shared.notify.len(), 1);
    let alone = label("alone");
    assert!(alone.registry.is_none(), "{:?}", alone.registry);
    assert!(alone.gate.is_none() && alone.lease.is_none() && alone.notify.is_empty());
    assert_eq!(shared.github_trigger.as_ref().unwrap().repo, "org/data");
    assert!(alone.github_trigger.is_none());

    // Without a registry, the default gate has nothing to compare with: the
    // error names the label's own key.
    let err = load_error(
        &dir,
        "[label_defaults]
threshold = 1
metadata = \"file://m.json\"
trainer = \"command:true\"
         registry = { json = \"r.json\", model = \"m\" }
gate = { metrics = [{ name = \"f1\", direction = \"higher\" }] }
         [labels.alone]
registry = \"none\"
",
    );
    assert_eq!(err.key.as_deref(), Some("labels.alone.registry"), "{err}");
}

#[test]
fn label_defaults_apply_to_labels_the_seed_env_names_define() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "[label_defaults]\npromote = \"manual\"\nmax_attempts = 3\n",
    );
    let loaded = load(&sources(Some(file), SEED_ENV)).unwrap();
    for name in ["department", "urgency"] {
        let label = &loaded.settings.labels[&Label::new(name).unwrap()];
        assert_eq!(label.promote, PromoteMode::Manual, "{name}");
        assert_eq!(label.max_attempts, 3, "{name}");
    }
    assert_eq!(
        loaded.settings.labels[&Label::new("urgency").unwrap()].threshold,
        30
    );
}
