//! The `retrain-server` binary: configuration errors exit 2 naming the key;
//! SIGTERM during a training exits 0 within `shutdown_timeout`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::processes::ServerProcess;
use crate::support::{Store, Workspace};

fn server(workspace: &Workspace) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_retrain-server"));
    cmd.current_dir(workspace.root())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NO_COLOR", "1")
        .arg("--config")
        .arg(workspace.config());
    cmd
}

#[test]
fn bad_server_settings_exit_2_naming_the_key() {
    let workspace = Workspace::new(&Store::Sqlite);
    let config = std::fs::read_to_string(workspace.config()).unwrap();
    let broken = config.replace("bind = \"127.0.0.1:0\"", "bind = \"localhost:eighty\"");
    std::fs::write(workspace.config(), broken).unwrap();
    let out = server(&workspace).envs(Workspace::env()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.bind"), "{stderr}");

    // No token configured and no --insecure-no-auth: refused, exit 2.
    let workspace = Workspace::new(&Store::Sqlite);
    let out = server(&workspace).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ADMIN_TOKEN"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_training_exits_0_in_time() {
    let workspace = Workspace::new(&Store::Sqlite);
    workspace.slow("intent", 60);
    let mut server = ServerProcess::start(&workspace).await;
    server.app.trigger(&["intent"]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while workspace.starts("intent") == 0 {
        assert!(Instant::now() < deadline, "training never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let began = Instant::now();
    let status = server.terminate().await;
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "still running {:?} after SIGTERM",
        began.elapsed()
    );
    assert_eq!(status.code(), Some(0));
}

/// An EC2 instance leased by an orchestrator that died (its lease row stays,
/// no lock is held) is stopped by a server that nobody triggers: the server
/// reaps at start-up (and every minute), as `retrain run` does before a cycle.
#[test]
fn an_idle_server_stops_an_instance_leased_by_a_process_that_is_gone() {
    use retrain_adapters::aws::AwsSettings;
    use retrain_adapters::ec2::{Ec2Client, InstanceState};
    use retrain_adapters::http::HttpPolicy;
    use retrain_core::domain::{Label, Lease, RunId};

    let Some(moto) = retrain_adapters::testing::services::service_url("RETRAIN_TEST_MOTO_URL")
    else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let aws = AwsSettings::new(
        "testing",
        secrecy::SecretString::from("testing"),
        "us-east-1",
    )
    .with_endpoint(reqwest::Url::parse(&moto).unwrap());
    let ec2 = Ec2Client::new(&aws, HttpPolicy::fast_for_tests()).unwrap();
    let state_of = |id: &str| {
        runtime
            .block_on(ec2.describe_instances(&[id.to_owned()]))
            .unwrap()
            .remove(0)
            .state
    };
    let instance = runtime.block_on(async {
        let id = retrain_adapters::testing::services::stopped_instance(&ec2).await;
        ec2.start_instances(std::slice::from_ref(&id))
            .await
            .unwrap();
        id
    });
    assert_eq!(state_of(&instance), InstanceState::Running);

    let workspace = Workspace::new(&Store::Sqlite);
    let config = std::fs::read_to_string(workspace.config()).unwrap();
    std::fs::write(
        workspace.config(),
        format!(
            "{config}
[labels.leased]
threshold = 10
counts = \"none\"
metadata = \"file://metadata.json\"
trainer = {{ command = [\"sh\", \"train.sh\"], timeout = \"2m\" }}
lease = {{ ec2 = [\"{instance}\"], region = \"us-east-1\", max = \"1h\" }}
gate = \"none\"
"
        ),
    )
    .unwrap();
    // The lease row a killed `retrain run` left behind (it holds no lock).
    runtime.block_on(async {
        let store = workspace.store().await;
        let now = chrono::Utc::now();
        let lease = Lease {
            id: "lease-of-a-dead-process".into(),
            label: Label::new("leased").unwrap(),
            run_id: RunId("run-of-a-dead-process".into()),
            provider: "ec2".into(),
            resources: vec![instance.clone()],
            region: Some("us-east-1".into()),
            acquired_at: now,
            max_until: now + chrono::Duration::hours(1),
            attributes: Default::default(),
            released_at: None,
        };
        store.put_lease_unfenced(&lease).await.unwrap();
    });

    let mut child = server(&workspace)
        .envs(Workspace::env())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", &moto)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let active_leases =
        || runtime.block_on(async { workspace.store().await.active_leases().await.unwrap() });
    let (state, active) = loop {
        let state = state_of(&instance);
        let active = active_leases();
        let stopped = matches!(state, InstanceState::Stopped | InstanceState::Stopping);
        if (stopped && active.is_empty()) || Instant::now() > deadline {
            break (state, active);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        matches!(state, InstanceState::Stopped | InstanceState::Stopping),
        "the leased instance is still {state:?}"
    );
    assert!(active.is_empty(), "the lease is still active: {active:?}");
}
