//! Server scenarios on loopback with the server in a process of its own
//! (this executable re-run as `scenarios serve`, no auth, loopback only),
//! so that its CPU time and RSS are its own (docs/BENCHMARKS.md, "Server"):
//!
//! - `sse`: a cycle of `--labels` labels (local command trainers) runs
//!   once with no stream client and once with `--clients` clients on
//!   `GET /v1/events`, each on a fresh store. Every client must receive
//!   exactly the lifecycle events of the journal (checked; a miss fails
//!   the run); prints the delivery lag from each event's `at` to its
//!   receipt, the cycle's duration and the server's RSS.
//! - `workers`: `--workers` simulated workers (register, heartbeat every
//!   `--heartbeat-interval`, `lease-job` long poll, result) against one
//!   server; `--jobs` labels with a worker trainer are triggered at
//!   `--rate` per second. Prints enqueue → receipt latency, heartbeat
//!   latency, the server's CPU time and RSS. `--state postgres://…` (a
//!   fresh, empty database) runs it on Postgres.
//! - `labels`: `--cycles` cycles of `--labels` labels populate the store
//!   (one finished run per label and cycle), then `--connections` clients
//!   send `GET /v1/labels?limit=1000` for `--seconds`.
//!
//! ```sh
//! cargo build --release -p retrain-server --example scenarios
//! target/release/examples/scenarios sse --labels 1000 --clients 100
//! target/release/examples/scenarios workers --workers 100 --jobs 300 --rate 10
//! target/release/examples/scenarios labels --labels 1000 --cycles 20
//! ```
//!
//! Every phase is bounded: at most 60 s of load, at most `--cycle-timeout`
//! per cycle.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use retrain_adapters::store::{open_stores, StoreOptions, Stores};
use retrain_core::lifecycle::LifecycleEvent;
use retrain_core::ports::RunStore;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

#[path = "support/mod.rs"]
mod support;

use support::{summary, Trainer};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// The server process of the other scenarios: serves the project in
    /// `--dir` until its stdin closes, after printing `listening ADDR`.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        dir: PathBuf,
    },
    /// SSE fan-out during a cycle.
    Sse(SseArgs),
    /// Simulated workers against one server.
    Workers(WorkersArgs),
    /// `GET /v1/labels` against a populated store.
    Labels(LabelsArgs),
}

#[derive(Debug, clap::Args)]
struct SseArgs {
    /// Labels in the cycle, 1..=10000.
    #[arg(long, default_value_t = 1000)]
    labels: usize,
    /// Clients on `GET /v1/events`, 1..=1000.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Longest wait for the cycle to end, 1..=60 seconds.
    #[arg(long, default_value_t = 60)]
    cycle_timeout: u64,
    /// Print every client's figures, not only the summary.
    #[arg(long)]
    per_client: bool,
}

#[derive(Debug, clap::Args)]
struct WorkersArgs {
    /// Simulated workers, 1..=1000.
    #[arg(long, default_value_t = 100)]
    workers: usize,
    /// Jobs (one label each), 1..=10000.
    #[arg(long, default_value_t = 300)]
    jobs: usize,
    /// Labels triggered per second.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Each worker's heartbeat interval (`1s`, `500ms`).
    #[arg(long, default_value = "1s", value_parser = retrain_adapters::settings::parse_duration)]
    heartbeat_interval: Duration,
    /// How long a simulated job runs before its result is posted.
    #[arg(long, default_value = "100ms", value_parser = retrain_adapters::settings::parse_duration)]
    job_duration: Duration,
    /// The whole load, 1..=60 seconds (it ends earlier once every job was
    /// received).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The run store: a fresh SQLite file when absent, or a URL of an
    /// empty database (`postgres://…`).
    #[arg(long)]
    state: Option<String>,
}

#[derive(Debug, clap::Args)]
struct LabelsArgs {
    /// Labels, 1..=10000.
    #[arg(long, default_value_t = 1000)]
    labels: usize,
    /// Cycles run first (each publishes a new version: one more finished
    /// run per label), 0..=100.
    #[arg(long, default_value_t = 20)]
    cycles: usize,
    /// Longest wait for each cycle, 1..=600 seconds.
    #[arg(long, default_value_t = 300)]
    cycle_timeout: u64,
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Duration of the load, 1..=60 seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    flag: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> anyhow::Result<()> {
    ensure!(
        range.contains(&value),
        "{flag} must be {}..={}, got {value}",
        range.start(),
        range.end()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.scenario {
            Scenario::Serve { dir } => serve(&dir).await,
            Scenario::Sse(args) => sse(&args).await,
            Scenario::Workers(args) => workers(&args).await,
            Scenario::Labels(args) => labels(&args).await,
        }
    })
}

/// `scenarios serve`: the server, until stdin closes (the parent exits or
/// stops it).
async fn serve(dir: &Path) -> anyhow::Result<()> {
    let app = support::build_server(dir).await?;
    println!("listening {}", app.addr());
    let (closed, stdin_closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = closed.send(());
    });
    app.run_until(async move {
        let _ = stdin_closed.await;
    })
    .await?;
    Ok(())
}

/// The server of a generated project, in a child process.
struct ServerProcess {
    child: Child,
    pid: String,
    base: String,
    /// The project (and SQLite store) directory.
    dir: tempfile::TempDir,
    /// The store URL as the parent opens it.
    state: String,
}

impl ServerProcess {
    async fn start(labels: usize, trainer: Trainer, state: Option<&str>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let state = match state {
            Some(url) => url.to_owned(),
            None => format!("sqlite://{}", dir.path().join("state.db").display()),
        };
        support::write_project(dir.path(), &state, labels, trainer)?;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["serve", "--dir"])
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the server process")?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .map(|_| line)
        })
        .await??;
        let Some(addr) = line.trim().strip_prefix("listening ") else {
            let _ = child.kill();
            bail!("the server process did not start (printed {line:?})");
        };
        let pid = child.id().to_string();
        Ok(Self {
            child,
            pid,
            base: format!("http://{addr}"),
            dir,
            state,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `(current, peak)` RSS in MiB.
    fn rss(&self) -> anyhow::Result<(f64, f64)> {
        support::rss_mib(&self.pid).context("reading the server's RSS")
    }

    fn cpu_time(&self) -> anyhow::Result<Duration> {
        support::cpu_time(&self.pid)
    }

    /// The store, read-only, from this process.
    async fn stores(&self) -> anyhow::Result<Stores> {
        Ok(open_stores(
            &self.state,
            StoreOptions {
                migrate: false,
                read_only: true,
            },
        )
        .await?)
    }

    /// Close its stdin and wait for a graceful exit.
    fn stop(mut self) -> anyhow::Result<()> {
        drop(self.child.stdin.take());
        let status = self.child.wait()?;
        ensure!(status.success(), "the server process ended with {status}");
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One event as a stream client saw it.
struct Received {
    id: u64,
    kind: String,
    /// From the event's `at` to its receipt.
    lag: Duration,
}

/// A `GET /v1/events` stream, parsed.
struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    async fn open(client: &reqwest::Client, url: &str) -> anyhow::Result<Self> {
        let response = client.get(url).send().await?;
        ensure!(
            response.status().is_success(),
            "GET {url} answered {}",
            response.status()
        );
        Ok(Self {
            response,
            buffer: String::new(),
        })
    }

    /// The next event; `None` when the server closed the stream.
    async fn next(&mut self) -> anyhow::Result<Option<Received>> {
        #[derive(serde::Deserialize)]
        struct At {
            at: DateTime<Utc>,
        }
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut kind, mut data) = (None, None, None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().parse::<u64>().context("an event id")?);
                    } else if let Some(v) = line.strip_prefix("event:") {
                        kind = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = Some(v.trim().to_owned());
                    }
                }
                // Keep-alive comments have none of these.
                if let (Some(id), Some(kind), Some(data)) = (id, kind, data) {
                    let at: At = serde_json::from_str(&data).context("an event's data")?;
                    let lag = (Utc::now() - at.at).to_std().unwrap_or_default();
                    return Ok(Some(Received { id, kind, lag }));
                }
            }
            match self.response.chunk().await? {
                Some(chunk) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                None => return Ok(None),
            }
        }
    }
}

/// Opened before a cycle is triggered: tells when `runs` runs have ended.
struct CycleObserver(EventStream);

impl CycleObserver {
    async fn open(client: &reqwest::Client, server: &ServerProcess) -> anyhow::Result<Self> {
        let url = server.url("/v1/events?types=run.finished,run.failed");
        Ok(Self(EventStream::open(client, &url).await?))
    }

    /// Wait until `runs` runs ended (failing if one failed) or `timeout`.
    async fn until_ended(&mut self, runs: usize, timeout: Duration) -> anyhow::Result<()> {
        let wait = async {
            let mut ended = 0;
            while ended < runs {
                let event = self.0.next().await?.context("the event stream closed")?;
                ensure!(
                    event.kind == "run.finished",
                    "a run failed (journal position {}): see the server's log",
                    event.id
                );
                ended += 1;
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(timeout, wait)
            .await
            .with_context(|| format!("the cycle did not end within {timeout:?}"))?
    }
}

async fn trigger(
    client: &reqwest::Client,
    server: &ServerProcess,
    body: Value,
) -> anyhow::Result<()> {
    let response = client
        .post(server.url("/v1/runs"))
        .json(&body)
        .send()
        .await?;
    ensure!(
        response.status() == reqwest::StatusCode::ACCEPTED,
        "POST /v1/runs answered {}: {}",
        response.status(),
        response.text().await.unwrap_or_default()
    );
    Ok(())
}

/// Run one cycle of every label; its duration.
async fn cycle(
    client: &reqwest::Client,
    server: &ServerProcess,
    labels: usize,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let mut observer = CycleObserver::open(client, server).await?;
    let began = Instant::now();
    trigger(client, server, json!({})).await?;
    observer.until_ended(labels, timeout).await?;
    Ok(began.elapsed())
}

/// The ids of every lifecycle event in the journal, in order.
async fn journal_event_ids(store: &dyn RunStore) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::new();
    let mut position = 0;
    loop {
        let entries = store.journal_after(position, None, 500).await?;
        let Some(last) = entries.last() else {
            return Ok(ids);
        };
        position = last.position;
        ids.extend(entries.iter().filter_map(LifecycleEvent::of).map(|e| e.id));
    }
}

struct SseRound {
    duration: Duration,
    rss: (f64, f64),
    clients: Vec<Vec<Received>>,
    expected: Vec<u64>,
}

async fn sse_round(args: &SseArgs, clients: usize) -> anyhow::Result<SseRound> {
    let server = ServerProcess::start(args.labels, Trainer::Command, None).await?;
    let client = reqwest::Client::new();
    let url = server.url("/v1/events?after=0");
    // Every client reads until it has received the last event of the
    // journal (known once the cycle ended) or the deadline.
    let (last_id, last_id_known) = tokio::sync::watch::channel(None::<u64>);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.cycle_timeout + 30);
    let mut readers = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut stream = EventStream::open(&client, &url).await?;
        let mut last_id_known = last_id_known.clone();
        readers.push(tokio::spawn(async move {
            let mut received = Vec::new();
            loop {
                let done = |received: &Vec<Received>, last: Option<u64>| {
                    last.is_some_and(|l| received.last().is_some_and(|r: &Received| r.id >= l))
                };
                if done(&received, *last_id_known.borrow()) {
                    return anyhow::Ok(received);
                }
                tokio::select! {
                    event = stream.next() => match event? {
                        Some(event) => received.push(event),
                        None => bail!("the server closed the stream"),
                    },
                    changed = last_id_known.changed() => changed?,
                    () = tokio::time::sleep_until(deadline) => return Ok(received),
                }
            }
        }));
    }
    let duration = cycle(
        &client,
        &server,
        args.labels,
        Duration::from_secs(args.cycle_timeout),
    )
    .await?;
    let rss = server.rss()?;
    let stores = server.stores().await?;
    let expected = journal_event_ids(stores.runs.as_ref()).await?;
    last_id.send_replace(expected.last().copied());
    let mut received = Vec::with_capacity(clients);
    for reader in readers {
        received.push(reader.await??);
    }
    server.stop()?;
    Ok(SseRound {
        duration,
        rss,
        clients: received,
        expected,
    })
}

async fn sse(args: &SseArgs) -> anyhow::Result<()> {
    check_range("--labels", args.labels, 1..=10_000)?;
    check_range("--clients", args.clients, 1..=1000)?;
    check_range("--cycle-timeout", args.cycle_timeout, 1..=60)?;
    let alone = sse_round(args, 0).await?;
    println!(
        "cycle of {} labels, no stream client: {:.2} s | server RSS {:.1} MiB (peak {:.1} MiB) | {} lifecycle events",
        args.labels,
        alone.duration.as_secs_f64(),
        alone.rss.0,
        alone.rss.1,
        alone.expected.len()
    );
    let fanned = sse_round(args, args.clients).await?;
    println!(
        "cycle of {} labels, {} stream clients: {:.2} s | server RSS {:.1} MiB (peak {:.1} MiB) | {} lifecycle events",
        args.labels,
        args.clients,
        fanned.duration.as_secs_f64(),
        fanned.rss.0,
        fanned.rss.1,
        fanned.expected.len()
    );
    let mut all = Vec::new();
    let (mut first_tenth, mut last_tenth) = (Vec::new(), Vec::new());
    let mut failures = Vec::new();
    let mut client_p99s = Vec::with_capacity(fanned.clients.len());
    for (n, events) in fanned.clients.iter().enumerate() {
        let ids: Vec<u64> = events.iter().map(|e| e.id).collect();
        if ids != fanned.expected {
            let missing = fanned
                .expected
                .iter()
                .filter(|id| !ids.contains(id))
                .count();
            failures.push(format!(
                "client {n}: {} events received, {} expected, {missing} missing",
                ids.len(),
                fanned.expected.len()
            ));
        }
        // In order of receipt: the tenths show whether the lag grows.
        let mut lags: Vec<Duration> = events.iter().map(|e| e.lag).collect();
        let tenth = lags.len() / 10;
        first_tenth.extend_from_slice(&lags[..tenth]);
        last_tenth.extend_from_slice(&lags[lags.len() - tenth..]);
        lags.sort();
        client_p99s.push(support::percentile(&lags, 99.0));
        all.extend_from_slice(&lags);
        if args.per_client {
            println!(
                "client {n:>4}: {} events | lag {}",
                events.len(),
                summary(&mut lags)
            );
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} clients did not receive exactly the journal's events:\n{}",
            failures.len(),
            fanned.clients.len(),
            failures.join("\n")
        );
    }
    println!(
        "every client received exactly the journal's {} events, in order",
        fanned.expected.len()
    );
    println!(
        "delivery lag (event `at` → receipt), all clients: {}",
        summary(&mut all)
    );
    client_p99s.sort();
    println!(
        "  per client: p99 from {:.2} ms to {:.2} ms",
        client_p99s[0].as_secs_f64() * 1000.0,
        client_p99s[client_p99s.len() - 1].as_secs_f64() * 1000.0
    );
    println!(
        "  first tenth of each client's events: {}",
        summary(&mut first_tenth)
    );
    println!(
        "  last tenth of each client's events:  {}",
        summary(&mut last_tenth)
    );
    Ok(())
}

/// What the simulated workers measured.
#[derive(Default)]
struct WorkerFigures {
    /// Job key → when its lease answer arrived.
    received: HashMap<String, DateTime<Utc>>,
    heartbeats: Vec<Duration>,
    errors: Vec<String>,
}

async fn register(
    client: &reqwest::Client,
    server: &ServerProcess,
    n: usize,
) -> anyhow::Result<String> {
    let response = client
        .post(server.url("/v1/workers"))
        .json(&json!({
            "name": format!("sim-{n:04}"),
            "hostname": "loopback",
            "resources": {"cpus": 8, "memory_bytes": 34359738368u64},
            "version": "bench",
        }))
        .send()
        .await?;
    ensure!(
        response.status() == reqwest::StatusCode::CREATED,
        "POST /v1/workers answered {}",
        response.status()
    );
    let body: Value = response.json().await?;
    body["worker_id"]
        .as_str()
        .map(str::to_owned)
        .context("no worker_id in the registration answer")
}

/// One simulated worker: heartbeats on a timer; long polls for a job,
/// "runs" it for `job_duration`, posts its result, polls again.
async fn simulate_worker(
    client: reqwest::Client,
    base: String,
    id: String,
    args: (Duration, Duration),
    figures: Arc<Mutex<WorkerFigures>>,
    stop: CancellationToken,
) {
    let (heartbeat_interval, job_duration) = args;
    let running: Arc<Mutex<Option<String>>> = Arc::default();
    let heartbeats = {
        let (client, base, id, figures, stop, running) = (
            client.clone(),
            base.clone(),
            id.clone(),
            figures.clone(),
            stop.clone(),
            running.clone(),
        );
        async move {
            let mut tick = tokio::time::interval(heartbeat_interval);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => return,
                }
                let job_key = running.lock().unwrap().clone();
                let body = match &job_key {
                    Some(key) => json!({"state": "running", "job_key": key}),
                    None => json!({"state": "idle"}),
                };
                let began = Instant::now();
                let sent = client
                    .post(format!("{base}/v1/workers/{id}/heartbeat"))
                    .json(&body)
                    .send()
                    .await;
                let mut figures = figures.lock().unwrap();
                match sent {
                    Ok(r) if r.status().is_success() => figures.heartbeats.push(began.elapsed()),
                    Ok(r) => figures
                        .errors
                        .push(format!("heartbeat answered {}", r.status())),
                    Err(e) => figures.errors.push(format!("heartbeat: {e}")),
                }
            }
        }
    };
    let jobs = async move {
        loop {
            let lease = client
                .post(format!("{base}/v1/workers/{id}/lease-job"))
                .json(&json!({"wait_secs": 25}))
                .send();
            let response = tokio::select! {
                r = lease => r,
                () = stop.cancelled() => return,
            };
            let job: Value = match response {
                Ok(r) if r.status() == reqwest::StatusCode::NO_CONTENT => continue,
                Ok(r) if r.status().is_success() => match r.json().await {
                    Ok(job) => job,
                    Err(e) => {
                        figures
                            .lock()
                            .unwrap()
                            .errors
                            .push(format!("lease-job body: {e}"));
                        return;
                    }
                },
                Ok(r) => {
                    figures
                        .lock()
                        .unwrap()
                        .errors
                        .push(format!("lease-job answered {}", r.status()));
                    return;
                }
                Err(e) => {
                    figures
                        .lock()
                        .unwrap()
                        .errors
                        .push(format!("lease-job: {e}"));
                    return;
                }
            };
            let at = Utc::now();
            let (Some(key), Some(run)) = (job["job_key"].as_str(), job["run_id"].as_str()) else {
                figures
                    .lock()
                    .unwrap()
                    .errors
                    .push(format!("a job without job_key/run_id: {job}"));
                return;
            };
            figures.lock().unwrap().received.insert(key.to_owned(), at);
            *running.lock().unwrap() = Some(key.to_owned());
            tokio::time::sleep(job_duration).await;
            let result = client
                .post(format!("{base}/v1/runs/{run}/results"))
                .json(&json!({
                    "job_key": key,
                    "worker_id": id,
                    "candidate": format!("cand-{run}"),
                    "metrics": {"accuracy": 0.9},
                }))
                .send()
                .await;
            *running.lock().unwrap() = None;
            match result {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => figures
                    .lock()
                    .unwrap()
                    .errors
                    .push(format!("results answered {}", r.status())),
                Err(e) => figures.lock().unwrap().errors.push(format!("results: {e}")),
            }
        }
    };
    tokio::join!(heartbeats, jobs);
}

async fn workers(args: &WorkersArgs) -> anyhow::Result<()> {
    check_range("--workers", args.workers, 1..=1000)?;
    check_range("--jobs", args.jobs, 1..=10_000)?;
    check_range("--seconds", args.seconds, 1..=60)?;
    ensure!(
        args.rate > 0.0 && args.rate <= 1000.0,
        "--rate must be in (0, 1000], got {}",
        args.rate
    );
    ensure!(
        !args.heartbeat_interval.is_zero(),
        "--heartbeat-interval must be more than 0"
    );
    let server = ServerProcess::start(args.jobs, Trainer::Worker, args.state.as_deref()).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(2 * args.workers)
        .build()?;
    let figures = Arc::new(Mutex::new(WorkerFigures::default()));
    let stop = CancellationToken::new();
    let mut simulated = Vec::with_capacity(args.workers);
    for n in 0..args.workers {
        let id = register(&client, &server, n).await?;
        simulated.push(tokio::spawn(simulate_worker(
            client.clone(),
            server.base.clone(),
            id,
            (args.heartbeat_interval, args.job_duration),
            figures.clone(),
            stop.clone(),
        )));
    }
    // Let every worker start its long poll before the first job.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_before = server.cpu_time()?;
    let began = Instant::now();
    let deadline = began + Duration::from_secs(args.seconds);
    let gap = Duration::from_secs_f64(1.0 / args.rate);
    for n in 0..args.jobs {
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep_until((began + gap * n as u32).into()).await;
        trigger(
            &client,
            &server,
            json!({"labels": [support::label_name(n)]}),
        )
        .await?;
    }
    while Instant::now() < deadline && figures.lock().unwrap().received.len() < args.jobs {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = began.elapsed();
    let cpu = server.cpu_time()? - cpu_before;
    let rss = server.rss()?;
    stop.cancel();
    for worker in simulated {
        worker.await?;
    }
    let figures = std::mem::take(&mut *figures.lock().unwrap());
    // Enqueue times from the store (the server's clock, the same machine's).
    let stores = server.stores().await?;
    let mut to_receipt = Vec::with_capacity(figures.received.len());
    let mut queue_wait = Vec::with_capacity(figures.received.len());
    for (key, at) in &figures.received {
        let job = stores
            .jobs
            .job(key)
            .await?
            .with_context(|| format!("job {key} is not in the store"))?;
        to_receipt.push((*at - job.enqueued_at).to_std().unwrap_or_default());
        if let Some(assigned) = job.assigned_at {
            queue_wait.push((assigned - job.enqueued_at).to_std().unwrap_or_default());
        }
    }
    drop(stores);
    server.stop()?;
    let mut heartbeats = figures.heartbeats;
    println!(
        "{} workers, heartbeat every {:?}, {} of {} jobs received in {:.1} s ({} triggered per second)",
        args.workers,
        args.heartbeat_interval,
        figures.received.len(),
        args.jobs,
        elapsed.as_secs_f64(),
        args.rate
    );
    println!(
        "enqueue → lease answer received: {}",
        summary(&mut to_receipt)
    );
    println!(
        "enqueue → assigned (store):      {}",
        summary(&mut queue_wait)
    );
    println!(
        "heartbeat request:               {}",
        summary(&mut heartbeats)
    );
    println!(
        "server CPU time {:.2} s over {:.1} s ({:.0} % of one core) | RSS {:.1} MiB (peak {:.1} MiB)",
        cpu.as_secs_f64(),
        elapsed.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64(),
        rss.0,
        rss.1
    );
    if !figures.errors.is_empty() {
        bail!(
            "{} failed requests, first: {}",
            figures.errors.len(),
            figures.errors[0]
        );
    }
    ensure!(
        figures.received.len() == args.jobs,
        "only {} of {} jobs reached a worker within {} s",
        figures.received.len(),
        args.jobs,
        args.seconds
    );
    Ok(())
}

async fn labels(args: &LabelsArgs) -> anyhow::Result<()> {
    check_range("--labels", args.labels, 1..=10_000)?;
    check_range("--cycles", args.cycles, 0..=100)?;
    check_range("--cycle-timeout", args.cycle_timeout, 1..=600)?;
    check_range("--connections", args.connections, 1..=1024)?;
    check_range("--seconds", args.seconds, 1..=60)?;
    let server = ServerProcess::start(args.labels, Trainer::Command, None).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let populating = Instant::now();
    for n in 1..=args.cycles {
        support::publish(server.dir.path(), &format!("v{n}"))?;
        cycle(
            &client,
            &server,
            args.labels,
            Duration::from_secs(args.cycle_timeout),
        )
        .await
        .with_context(|| format!("cycle {n}"))?;
    }
    let populated = populating.elapsed();
    let url = server.url(&format!("/v1/labels?limit={}", args.labels.min(1000)));
    let first = client.get(&url).send().await?;
    ensure!(
        first.status().is_success(),
        "GET {url} answered {}",
        first.status()
    );
    first.bytes().await?;
    let cpu_before = server.cpu_time()?;
    let began = Instant::now();
    let mut load = support::get_load(
        &client,
        &url,
        args.connections,
        began + Duration::from_secs(args.seconds),
        u64::MAX,
    )
    .await?;
    let elapsed = began.elapsed();
    let cpu = server.cpu_time()? - cpu_before;
    let rss = server.rss()?;
    server.stop()?;
    println!(
        "{} labels, {} finished runs each (populated in {:.1} s) | {} connections | {:.1} s",
        args.labels,
        args.cycles,
        populated.as_secs_f64(),
        args.connections,
        elapsed.as_secs_f64()
    );
    println!(
        "GET /v1/labels?limit={}: ok {} | errors {} | {:.0} req/s",
        args.labels.min(1000),
        load.latencies.len(),
        load.errors,
        load.latencies.len() as f64 / elapsed.as_secs_f64()
    );
    println!("latency {}", summary(&mut load.latencies));
    println!(
        "server CPU time {:.2} s ({:.0} % of one core) | RSS {:.1} MiB (peak {:.1} MiB)",
        cpu.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64(),
        rss.0,
        rss.1
    );
    ensure!(load.errors == 0, "{} requests failed", load.errors);
    Ok(())
}
