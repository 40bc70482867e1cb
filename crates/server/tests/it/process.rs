//! The `retrain-server` binary: configuration errors exit 2 naming the key;
//! SIGTERM during a training exits 0 within `shutdown_timeout`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

#[test]
fn sigterm_during_a_training_exits_0_in_time() {
    let workspace = Workspace::new(&Store::Sqlite);
    workspace.slow("intent", 60);
    let mut child = server(&workspace)
        .envs(Workspace::env())
        .env("RETRAIN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("addr=").nth(1) {
                let _ = addr_tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("no listening line");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let response = reqwest::Client::new()
            .post(format!("http://{addr}/v1/runs"))
            .bearer_auth(crate::support::TRIGGER)
            .json(&serde_json::json!({"labels": ["intent"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while workspace.starts("intent") == 0 {
        assert!(Instant::now() < deadline, "training never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let began = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}
