//! Two `retrain-server` replicas (in-process `Application`s) and a CLI
//! `retrain run`, all on one Postgres, triggered at once: each label is
//! trained exactly once (fenced locks), whoever drives it.

use std::time::{Duration, Instant};

use retrain_adapters::settings::{load, ConfigSources};
use retrain_server::{Application, ServeOptions};
use retrain_tests::services::fresh_postgres_database;
use retrain_tests::Project;
use serde_json::{json, Value};

const TOKEN: &str = "replica-token-0123456789";

const TRAIN_SH: &str = r#"
echo "$RETRAIN_LABEL" >> starts.log
sleep 1
printf '{"candidate": "cand", "metrics": {"accuracy": 0.9}}' > "$RETRAIN_RESULT"
"#;

fn config(state: &str) -> String {
    let mut config = format!(
        "state = \"{state}\"\nstate_dir = \".retrain\"\n[poll]\ninterval = \"100ms\"\ntimeout = \"1m\"\n[server]\nbind = \"127.0.0.1:0\"\n"
    );
    for label in LABELS {
        config.push_str(&format!(
            "[labels.{label}]\nthreshold = 10\ncounts = \"none\"\nmetadata = \"file://metadata.json\"\ntrainer = {{ command = [\"sh\", \"train.sh\"], timeout = \"2m\" }}\ngate = \"none\"\n"
        ));
    }
    config
}

const LABELS: [&str; 3] = ["intent", "urgency", "department"];

fn starts(project: &Project, label: &str) -> usize {
    project
        .lines("starts.log")
        .iter()
        .filter(|l| *l == label)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_and_a_cli_on_one_postgres_train_each_label_once() {
    let Some(state) = fresh_postgres_database().await else {
        return;
    };
    let project = Project::new();
    project.config(&config(&state)).write("train.sh", TRAIN_SH).write(
        "metadata.json",
        r#"{"dataset_name": "tickets", "version_tag": "v1", "num_samples": 100, "created_at": "2026-01-02T00:00:00Z"}"#,
    );
    let sources = ConfigSources {
        file: Some(project.join("retrain.toml")),
        env: vec![("RETRAIN_SERVER_TOKEN".into(), TOKEN.into())],
        overrides: Vec::new(),
    };
    let mut servers = Vec::new();
    for _ in 0..2 {
        let app = Application::build(load(&sources).unwrap(), ServeOptions::default())
            .await
            .unwrap();
        let addr = app.addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        servers.push((addr, stop, served));
    }
    let client = reqwest::Client::new();
    let trigger = |addr: std::net::SocketAddr| {
        let client = client.clone();
        async move {
            let response = client
                .post(format!("http://{addr}/v1/runs"))
                .bearer_auth(TOKEN)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
            response.json::<Value>().await.unwrap()
        }
    };
    let mut cli = project.retrain();
    cli.args(["--output", "json", "run"]);
    let cli = tokio::process::Command::from(cli).output();
    let (a, b, cli) = tokio::join!(trigger(servers[0].0), trigger(servers[1].0), cli);
    let cli = cli.unwrap();
    assert!(
        cli.status.code() == Some(0),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    // Every label ends trained once, whoever drove it; wait for the
    // servers' background cycles.
    let deadline = Instant::now() + Duration::from_secs(60);
    while LABELS.iter().any(|l| starts(&project, l) == 0) {
        assert!(Instant::now() < deadline, "{a} {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for label in LABELS {
        assert_eq!(starts(&project, label), 1, "{label}: {a} {b}");
    }
    for (_, stop, served) in servers {
        let _ = stop.send(());
        served.await.unwrap().unwrap();
    }
    for label in LABELS {
        assert_eq!(
            starts(&project, label),
            1,
            "{label} trained again on shutdown"
        );
    }
}
