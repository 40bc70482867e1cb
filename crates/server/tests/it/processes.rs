//! Real processes for the tests that need them: a `retrain-server` process
//! ([`ServerProcess`]) and `retrain worker` agents ([`WorkerProcess`]),
//! signalled like an operator or systemd would, their stderr kept for
//! assertions and for the failure messages.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{TestApp, Workspace, WORKER};

/// How long a process gets to come up, register or exit.
const PATIENCE: Duration = Duration::from_secs(60);

/// The lines a process wrote to stderr so far (a thread reads them).
#[derive(Debug, Clone, Default)]
pub struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    fn follow(child: &mut Child) -> Self {
        let output = Self::default();
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = output.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        output
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    /// Wait until a line contains `needle`; the first such line.
    pub async fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(line) = self.0.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} in:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `kill -<signal> <pid>` (the way an operator or systemd does it).
pub fn signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{signal} {pid} failed");
}

/// Whether `pid` is a running process (not a zombie waiting to be reaped).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(!matches!(state, 'Z' | 'X'))
        })
        .unwrap_or(false)
}

/// Wait until `pid` is gone.
pub async fn wait_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while running(pid) {
        assert!(Instant::now() < deadline, "{what} (pid {pid}) still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A port of 127.0.0.1 free now: a server bound to it keeps its address
/// across a restart, so the workers find it again.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait for `child` to exit.
async fn wait_exit(child: &mut Child, what: &str, output: &Output) -> ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} still runs; its output:\n{}",
            output.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `retrain-server` process on a workspace (its `[server] bind` decides
/// the address), with an HTTP client ([`TestApp::at`]) for it.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    pub app: TestApp,
    pub output: Output,
}

impl ServerProcess {
    /// Start it and wait until it listens.
    pub async fn start(workspace: &Workspace) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_retrain-server"))
            .current_dir(workspace.root())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("NO_COLOR", "1")
            .env("RETRAIN_LOG", "info")
            .envs(Workspace::env())
            .arg("--config")
            .arg(workspace.config())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Output::follow(&mut child);
        let line = output.wait_for("addr=").await;
        let addr: SocketAddr = line
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Self {
            child,
            app: TestApp::at(addr),
            output,
        }
    }

    /// The base URL workers are given.
    pub fn url(&self) -> String {
        self.app.url("")
    }

    /// SIGTERM, then its exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        signal(self.child.id(), "TERM");
        wait_exit(&mut self.child, "retrain-server", &self.output).await
    }

    /// The registered workers (`GET /v1/workers`).
    pub async fn workers(&self) -> Vec<Value> {
        let listed: Value = self.app.read_json("/v1/workers").await;
        listed["workers"].as_array().cloned().unwrap_or_default()
    }

    /// The run as `GET /v1/runs/{id}` shows it.
    pub async fn run(&self, run_id: &str) -> Value {
        self.app.read_json(&format!("/v1/runs/{run_id}")).await
    }

    /// Poll the run until `done` holds for it; the run.
    pub async fn wait_run(&self, run_id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let run = self.run(run_id).await;
            if done(&run) {
                return run;
            }
            assert!(Instant::now() < deadline, "{what} never happened: {run}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `retrain worker` process. Its work directory is `work-<name>` in the
/// workspace, so a worker started again under the same name finds what the
/// previous one left there. Its jobs run in the workspace (the agent's
/// working directory) and see the worker's name as `$TEST_WORKER`.
#[derive(Debug)]
pub struct WorkerProcess {
    child: Child,
    pub name: String,
    pub output: Output,
}

impl WorkerProcess {
    /// `retrain worker --server <server> --name <name> <args>`.
    pub fn start(server: &ServerProcess, workspace: &Workspace, name: &str, args: &[&str]) -> Self {
        let mut child = Command::new(retrain_tests::retrain_bin())
            .current_dir(workspace.root())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("NO_COLOR", "1")
            .env("RETRAIN_LOG", "info")
            .env("RETRAIN_WORKER_TOKEN", WORKER)
            .env("TEST_WORKER", name)
            .args(["worker", "--server", &server.url(), "--name", name])
            .arg("--work-dir")
            .arg(Self::work_dir(workspace, name))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Output::follow(&mut child);
        Self {
            child,
            name: name.to_owned(),
            output,
        }
    }

    pub fn work_dir(workspace: &Workspace, name: &str) -> PathBuf {
        workspace.root().join(format!("work-{name}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -<signal>` the agent (only the agent: its job has a process
    /// group of its own).
    pub fn signal(&self, name: &str) {
        signal(self.pid(), name);
    }

    /// Wait until the server lists this worker live (not stale, and not one
    /// of the ids in `except`: an earlier registration of the same name);
    /// its worker id.
    pub async fn registered(&self, server: &ServerProcess, except: &[String]) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let live = server.workers().await.into_iter().find(|w| {
                w["name"] == self.name.as_str()
                    && w["state"] != "stale"
                    && !except.iter().any(|id| w["worker_id"] == id.as_str())
            });
            if let Some(worker) = live {
                return worker["worker_id"].as_str().unwrap().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "worker {} never registered; its output:\n{}",
                self.name,
                self.output.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait for the agent to exit; its status.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let what = format!("worker {}", self.name);
        wait_exit(&mut self.child, &what, &self.output).await
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line of `ran.log`: a job's start, as the job itself recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ran {
    pub label: String,
    pub attempt: u32,
    pub worker: String,
    /// The job's process (its group leader).
    pub pid: u32,
}

/// The jobs started so far in `root`, in order.
pub fn ran(root: &Path) -> Vec<Ran> {
    std::fs::read_to_string(root.join("ran.log"))
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let parts: Vec<&str> = line.split(' ').collect();
            let [label, attempt, worker, pid] = parts[..] else {
                panic!("malformed ran.log line {line:?}");
            };
            Ran {
                label: label.to_owned(),
                attempt: attempt.parse().unwrap(),
                worker: worker.to_owned(),
                pid: pid.parse().unwrap(),
            }
        })
        .collect()
}

/// Wait until `count` jobs of `label` have started; those.
pub async fn wait_started(root: &Path, label: &str, count: usize) -> Vec<Ran> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let started: Vec<Ran> = ran(root).into_iter().filter(|r| r.label == label).collect();
        if started.len() >= count {
            return started;
        }
        assert!(
            Instant::now() < deadline,
            "{count} job(s) of {label} never started: {started:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
